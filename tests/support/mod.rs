//! Test support: the real `fleetlb` binary on free loopback ports, a tiny HTTP client, and
//! process inspection through /proc. Every wait polls with a deadline.

#![allow(dead_code)]

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const DEADLINE: Duration = Duration::from_secs(30);

/// A loopback port where nothing listens, held for as long as the socket lives: bound but not
/// listening, so connections are refused and no other test can take the port meanwhile.
pub fn dead_port() -> (tokio::net::TcpSocket, u16) {
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket
        .bind("127.0.0.1:0".parse().unwrap())
        .expect("bind port 0");
    let port = socket.local_addr().expect("bound").port();
    (socket, port)
}

/// A port nothing listens on now, below Linux's ephemeral range (32768-60999), so no outgoing
/// connection is given it before the test binds it.
pub fn free_port() -> u16 {
    // Never the same port twice in one test binary: two tests running at once would otherwise
    // both find it free before either binds it (etcd then fails with "address in use").
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    for _ in 0..1000 {
        let port = fastrand::u16(20_000..32_000);
        if !given.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
    panic!("no free port between 20000 and 32000");
}

/// Polls `f` every 50 ms until it returns `Some`, or panics with `what` after `DEADLINE`.
pub fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < end,
            "timed out after {DEADLINE:?} waiting for: {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A response: status and body.
pub struct Resp {
    pub status: u16,
    pub body: String,
}

/// One HTTP/1.1 request on a fresh connection. `None` when the connection fails.
pub fn request(addr: SocketAddr, raw: &str) -> Option<Resp> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(raw.as_bytes()).ok()?;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some(Resp { status, body })
}

pub fn get(addr: SocketAddr, path: &str) -> Option<Resp> {
    request(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"),
    )
}

/// The instance id named in a backend's JSON answer.
pub fn instance_of(body: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    v["instance_id"].as_str().map(str::to_string)
}

/// A running `fleetlb demo` (or `standalone`) process, killed on drop.
pub struct Fleetlb {
    pub child: Child,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    pub log: PathBuf,
}

impl Fleetlb {
    /// Starts `fleetlb demo` with the given YAML files in a fresh config dir, its listeners on
    /// ports the kernel picks (port 0), read back from its start line.
    pub fn demo(files: &[(&str, String)]) -> Self {
        Self::start("demo", files, &[], None)
    }

    /// Starts `fleetlb standalone` (one proxy thread) like [`Fleetlb::demo`], with extra flags
    /// (limits). `wrap` runs it under a shell prefix (e.g. `ulimit -n 64;`), or none.
    pub fn standalone(files: &[(&str, String)], args: &[&str], wrap: Option<&str>) -> Self {
        let mut all = vec!["--proxy-threads", "1"];
        all.extend_from_slice(args);
        Self::start("standalone", files, &all, wrap)
    }

    /// [`Fleetlb::standalone`] with `env` set.
    pub fn standalone_env(files: &[(&str, String)], args: &[&str], env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).expect("write config");
        }
        let config = dir.path().to_str().expect("utf-8 path").to_owned();
        let mut all = vec!["standalone", "--config", &config, "--proxy-threads", "1"];
        all.extend_from_slice(args);
        Self::spawn(dir, &all, env, None)
    }

    fn start(mode: &str, files: &[(&str, String)], args: &[&str], wrap: Option<&str>) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).expect("write config");
        }
        let config = dir.path().to_str().expect("utf-8 path").to_owned();
        let mut all = vec![mode, "--config", &config];
        all.extend_from_slice(args);
        Self::spawn(dir, &all, &[], wrap)
    }

    /// Starts `fleetlb run` (Kubernetes mode) with `env` (KUBECONFIG, POD_NAMESPACE, ...)
    /// and extra flags, on ports the kernel picks.
    pub fn run(env: &[(&str, &str)], args: &[&str]) -> Self {
        let mut all = vec!["run"];
        all.extend_from_slice(args);
        Self::spawn(tempfile::tempdir().expect("tempdir"), &all, env, None)
    }

    fn spawn(
        dir: tempfile::TempDir,
        args: &[&str],
        env: &[(&str, &str)],
        wrap: Option<&str>,
    ) -> Self {
        let log = dir.path().join("fleetlb.log");
        // FLEETLB_BIN runs another build (e.g. an older one, to see a test fail on it).
        let exe = std::env::var("FLEETLB_BIN").unwrap_or(env!("CARGO_BIN_EXE_fleetlb").into());
        let mut cmd = match wrap {
            Some(prefix) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("{prefix} exec \"$0\" \"$@\""))
                    .arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        let child = cmd
            .args(&args[..1])
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .args(&args[1..])
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            // What it prints (the demo's access log), kept beside its log.
            .stdout(std::fs::File::create(dir.path().join("stdout.log")).expect("stdout file"))
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("fleetlb starts");
        // `... fleetlb started proxy=ADDR admin=ADDR ...`
        let (proxy, admin) = eventually("the start line", || {
            let text = std::fs::read_to_string(&log).ok()?;
            let line = text.lines().find(|l| l.contains("fleetlb started"))?;
            let field = |k: &str| {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(k))
                    .and_then(|a| a.parse::<SocketAddr>().ok())
            };
            Some((field("proxy=")?, field("admin=")?))
        });
        let f = Self {
            child,
            proxy,
            admin,
            dir,
            log,
        };
        let end = Instant::now() + DEADLINE;
        loop {
            let r = get(f.admin, "/readyz");
            if r.as_ref().is_some_and(|r| r.status == 200) {
                break;
            }
            assert!(
                Instant::now() < end,
                "fleetlb not ready after {DEADLINE:?} (/readyz: {}); its log:\n{}",
                r.map_or("no answer".into(), |r| format!(
                    "{} {}",
                    r.status,
                    r.body.trim()
                )),
                f.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        f
    }

    /// A metric's value from `/metrics` (summed over the series whose labels include
    /// `labels`), 0 when absent.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let text = get(self.admin, "/metrics")
            .map(|r| r.body)
            .unwrap_or_default();
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| {
                let series = l.split_whitespace().next().unwrap_or("");
                (series == name || series.starts_with(&format!("{name}{{")))
                    && labels
                        .iter()
                        .all(|(k, v)| series.contains(&format!("{k}=\"{v}\"")))
            })
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .sum()
    }

    /// Waits until the demo's `/cluster1` (on two instances at least) and `/cluster2` answer.
    pub fn wait_both_clusters_serve(&self, what: &str) {
        eventually(what, || {
            self.distinct_instances("/cluster1", 20)
                .filter(|ids| ids.len() >= 2)
                .and_then(|_| self.distinct_instances("/cluster2", 20))
        });
    }

    /// `/debug/endpoints` as JSON.
    pub fn endpoints(&self) -> serde_json::Value {
        let r = get(self.admin, "/debug/endpoints").expect("debug endpoints answers");
        serde_json::from_str(&r.body).expect("JSON")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn write(&self, name: &str, text: &str) {
        // Write then rename, as editors do, so the watcher never sees half a file.
        let tmp = self.dir.path().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).expect("write");
        std::fs::rename(&tmp, self.dir.path().join(name)).expect("rename");
    }

    pub fn remove(&self, name: &str) {
        std::fs::remove_file(self.dir.path().join(name)).expect("remove");
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn status(&self) -> serde_json::Value {
        let r = get(self.admin, "/status").expect("status answers");
        serde_json::from_str(&r.body).expect("status is JSON")
    }

    /// Distinct instances that answered `n` requests to `path` (all must be 200).
    pub fn distinct_instances(&self, path: &str, n: usize) -> Option<HashSet<String>> {
        let mut ids = HashSet::new();
        for _ in 0..n {
            let r = get(self.proxy, path)?;
            if r.status != 200 {
                return None;
            }
            ids.insert(instance_of(&r.body)?);
        }
        Some(ids)
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .expect("kill runs")
            .success();
        assert!(ok, "kill {sig} failed");
    }
}

impl Drop for Fleetlb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Live `fleetlb backend` processes whose parent is `parent`, optionally of one cluster:
/// (pid, command line).
pub fn backends_of(parent: u32, cluster: Option<&str>) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Some(ppid) = ppid(pid) else { continue };
        if ppid != parent {
            continue;
        }
        let cmd = cmdline(pid);
        if !cmd.contains(" backend ") {
            continue;
        }
        if let Some(c) = cluster
            && !cmd.contains(&format!("--cluster {c} "))
        {
            continue;
        }
        out.push((pid, cmd));
    }
    out
}

/// One live backend of `cluster` under `parent`: (pid, instance id).
pub fn a_backend_of(parent: u32, cluster: &str) -> (u32, String) {
    let (pid, cmd) = backends_of(parent, Some(cluster))
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("a {cluster} backend"));
    let id = cmd
        .split_whitespace()
        .skip_while(|w| *w != "--id")
        .nth(1)
        .expect("--id in the command line")
        .to_string();
    (pid, id)
}

/// Whether a process exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

fn ppid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?;
    if state == "Z" {
        return None;
    }
    fields.next()?.parse().ok()
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            let s: Vec<String> = b
                .split(|c| *c == 0)
                .map(|p| String::from_utf8_lossy(p).to_string())
                .collect();
            s.join(" ")
        })
        .unwrap_or_default()
}

pub fn example(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples")
            .join(name),
    )
    .expect("example exists")
}

/// Reads one HTTP/1 message head from `s` into `buf` (what follows it stays in `buf`); `None`
/// at end of stream.
pub async fn read_head(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    use tokio::io::AsyncReadExt;
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end + 4]).to_string();
            buf.drain(..end + 4);
            return Some(head);
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}
