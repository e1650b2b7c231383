//! The container image as shipped: made by `image/build.sh` with buildah `FROM scratch` (the
//! static musl binary, CA certificates, user 65532, a writable /tmp), run the way a node would
//! run it, with `buildah run --isolation chroot`. `.ci/test` builds it first
//! (`PROFILE=release image/build.sh localhost/fleetlb:test`).

mod support;

use std::process::{Command, Stdio};

use support::{eventually, get};

fn image() -> String {
    std::env::var("FLEETLB_IMAGE").unwrap_or_else(|_| "localhost/fleetlb:test".into())
}

fn buildah(args: &[&str]) -> std::process::Output {
    Command::new("buildah")
        .args(args)
        .output()
        .expect("buildah runs (Debian's buildah; .ci/test installs it)")
}

/// A working container of the image, removed when dropped.
struct Container(String);

impl Container {
    fn new() -> Self {
        let image = image();
        let found = buildah(&["inspect", "--type", "image", &image]);
        assert!(
            found.status.success(),
            "no image {image}: build it with `PROFILE=release image/build.sh {image}` (.ci/test does)"
        );
        let out = buildah(&["from", "--pull-never", &image]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    fn run(&self, args: &[&str]) -> Command {
        let mut c = Command::new("buildah");
        c.args(["run", "--isolation", "chroot", &self.0, "--"])
            .args(args);
        c
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = buildah(&["rm", &self.0]);
    }
}

/// Processes whose command line contains `needle`.
fn processes_with(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) && !cmdline.starts_with("buildah") {
            out.push(pid);
        }
    }
    out
}

#[test]
fn the_image_is_from_scratch_non_root_and_its_binary_runs() {
    let config = buildah(&["inspect", "--type", "image", &image()]);
    let config: serde_json::Value =
        serde_json::from_slice(&config.stdout).expect("buildah inspect prints JSON");
    let oci = &config["OCIv1"]["config"];
    assert_eq!(oci["User"], "65532:65532", "{oci:#}");
    assert_eq!(
        oci["Entrypoint"],
        serde_json::json!(["/usr/local/bin/fleetlb"])
    );
    assert_eq!(oci["Cmd"], serde_json::json!(["run"]));
    // One layer: nothing but what image/build.sh put there.
    assert_eq!(
        config["OCIv1"]["rootfs"]["diff_ids"]
            .as_array()
            .map(Vec::len),
        Some(1),
        "{config:#}"
    );

    let c = Container::new();
    let out = c
        .run(&["/usr/local/bin/fleetlb", "--version"])
        .output()
        .unwrap();
    let version = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && version.starts_with("fleetlb "),
        "{version}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        version.trim(),
        format!("fleetlb {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn the_demo_runs_in_the_image_and_answers() {
    let c = Container::new();
    let (proxy, admin) = (support::free_port(), support::free_port());
    let (listen, admin_flag) = (format!("127.0.0.1:{proxy}"), format!("127.0.0.1:{admin}"));
    let mut child = c
        .run(&[
            "/usr/local/bin/fleetlb",
            "demo",
            "--listen",
            &listen,
            "--admin",
            &admin_flag,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let admin: std::net::SocketAddr = admin_flag.parse().unwrap();
    let proxy: std::net::SocketAddr = listen.parse().unwrap();
    let ready = std::panic::catch_unwind(|| {
        eventually("/readyz answers 200 from the image's fleetlb", || {
            get(admin, "/readyz").filter(|r| r.status == 200)
        });
        // The built-in demo clusters (no examples/ in the image): instances are the image's
        // own binary, started as the non-root user, writing to /tmp.
        eventually("/cluster1 served by an instance", || {
            get(proxy, "/cluster1").filter(|r| r.status == 200)
        })
    });
    for pid in processes_with(&format!("--admin {admin_flag}")) {
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    let status = child.wait().unwrap();
    let mut log = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut log);
    }
    let answer =
        ready.unwrap_or_else(|_| panic!("the demo in the image did not answer; its log:\n{log}"));
    assert!(answer.body.contains("cluster1"), "{}", answer.body);
    assert!(
        status.success(),
        "fleetlb in the image exited with {status}:\n{log}"
    );
}
