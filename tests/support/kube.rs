//! A real Kubernetes control plane on loopback, as controller-runtime's envtest runs one: the
//! `etcd` and `kube-apiserver` of the release pinned in `tests/kube/go.mod` (built once per
//! machine by `tests/kube/build.sh`), with a generated serving certificate, a service-account
//! signing key, a static admin token, the RBAC authorizer and an audit log. No kubelet, no
//! scheduler: pods never run, everything else (CRDs, admission, RBAC, SSA, watches, Leases,
//! Events) is the real thing. Each control plane lives as long as its value.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::support::free_port;

const ADMIN_TOKEN: &str = "fleetlb-tests-admin-token";

/// The built binaries' directory (`tests/kube/build.sh` builds them when missing).
pub fn binaries() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kube/build.sh");
        let out = Command::new(&script)
            .stderr(Stdio::inherit())
            .output()
            .expect("tests/kube/build.sh runs");
        assert!(
            out.status.success(),
            "tests/kube/build.sh failed: the tests need Go to build etcd and kube-apiserver"
        );
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
    .clone()
}

/// One etcd and one kube-apiserver, killed when dropped.
pub struct ControlPlane {
    pub dir: tempfile::TempDir,
    /// `https://127.0.0.1:PORT`.
    pub server: String,
    /// The admin's kubeconfig (`system:masters` through the static token).
    pub admin: PathBuf,
    pub audit_log: PathBuf,
    etcd: Child,
    apiserver: Child,
    etcd_args: Vec<String>,
    apiserver_args: Vec<String>,
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        for child in [&mut self.apiserver, &mut self.etcd] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl ControlPlane {
    /// Starts etcd and kube-apiserver on free loopback ports and waits until the API server is
    /// ready (`/readyz`) and its bootstrap RBAC exists.
    pub fn start() -> Self {
        let bin = binaries();
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();

        // A CA, a serving certificate for 127.0.0.1 signed by it, the service-account key.
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let mut ca = rcgen::CertificateParams::new(Vec::new()).expect("CA params");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "fleetlb-tests-ca");
        let ca_cert = ca.self_signed(&ca_key).expect("CA cert");
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().expect("serving key");
        let mut leaf = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
            .expect("serving params");
        leaf.distinguished_name
            .push(rcgen::DnType::CommonName, "kube-apiserver");
        let cert = leaf.signed_by(&key, &issuer).expect("serving cert");
        let sa_key = rcgen::KeyPair::generate().expect("service-account key");
        std::fs::write(d.join("ca.crt"), ca_cert.pem()).unwrap();
        std::fs::write(d.join("serving.crt"), cert.pem()).unwrap();
        std::fs::write(d.join("serving.key"), key.serialize_pem()).unwrap();
        std::fs::write(d.join("sa.key"), sa_key.serialize_pem()).unwrap();
        std::fs::write(d.join("sa.pub"), sa_key.public_key_pem()).unwrap();
        std::fs::write(
            d.join("tokens.csv"),
            format!("{ADMIN_TOKEN},admin,admin-uid,system:masters\n"),
        )
        .unwrap();
        // Every request at Metadata level: who, which verb on which resource, and the answer.
        std::fs::write(
            d.join("audit-policy.yaml"),
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nrules:\n  - level: Metadata\n",
        )
        .unwrap();

        let (client, peer, secure) = (free_port(), free_port(), free_port());
        let path = |p: &str| d.join(p).display().to_string();
        let etcd_args: Vec<String> = [
            "--name=default".to_string(),
            format!("--data-dir={}", path("etcd")),
            format!("--listen-client-urls=http://127.0.0.1:{client}"),
            format!("--advertise-client-urls=http://127.0.0.1:{client}"),
            format!("--listen-peer-urls=http://127.0.0.1:{peer}"),
            format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"),
            format!("--initial-cluster=default=http://127.0.0.1:{peer}"),
            "--unsafe-no-fsync".into(),
            "--log-level=warn".into(),
        ]
        .into();
        let audit_log = d.join("audit.log");
        let apiserver_args: Vec<String> = [
            format!("--etcd-servers=http://127.0.0.1:{client}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={secure}"),
            format!("--cert-dir={}", path("certs")),
            format!("--tls-cert-file={}", path("serving.crt")),
            format!("--tls-private-key-file={}", path("serving.key")),
            format!("--token-auth-file={}", path("tokens.csv")),
            "--authorization-mode=RBAC".into(),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-account-key-file={}", path("sa.pub")),
            format!("--service-account-signing-key-file={}", path("sa.key")),
            "--service-cluster-ip-range=10.0.0.0/24".into(),
            format!("--audit-policy-file={}", path("audit-policy.yaml")),
            format!("--audit-log-path={}", audit_log.display()),
            "--audit-log-mode=blocking".into(),
            "--v=0".into(),
        ]
        .into();
        let etcd = spawn(&bin.join("etcd"), &etcd_args, &d.join("etcd.log"));
        let apiserver = spawn(
            &bin.join("kube-apiserver"),
            &apiserver_args,
            &d.join("apiserver.log"),
        );
        let server = format!("https://127.0.0.1:{secure}");
        let admin = d.join("admin.kubeconfig");
        write_kubeconfig(&admin, &server, &d.join("ca.crt"), ADMIN_TOKEN);
        let mut cp = Self {
            dir,
            server,
            admin,
            audit_log,
            etcd,
            apiserver,
            etcd_args,
            apiserver_args,
        };
        cp.wait_ready(Duration::from_secs(120));
        cp
    }

    fn wait_ready(&mut self, within: Duration) {
        let end = Instant::now() + within;
        loop {
            let exited = [("etcd", &mut self.etcd), ("apiserver", &mut self.apiserver)]
                .into_iter()
                .find_map(|(name, child)| Some((name, child.try_wait().ok()??)));
            if let Some((name, status)) = exited {
                panic!(
                    "{name} exited ({status}); its log:\n{}",
                    self.log(&format!("{name}.log"))
                );
            }
            let ready = self.kubectl(&["get", "--raw", "/readyz"]).status.success()
                && self
                    .kubectl(&["get", "clusterrole", "cluster-admin"])
                    .status
                    .success();
            if ready {
                return;
            }
            assert!(
                Instant::now() < end,
                "kube-apiserver not ready after {within:?}; its log:\n{}",
                self.log("apiserver.log")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The tail of one of the control plane's logs (for failure messages).
    pub fn log(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// The pinned `kubectl` as the admin.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_as(&self.admin, args, None)
    }

    /// The pinned `kubectl` with `kubeconfig`, `stdin` piped in when given.
    pub fn kubectl_as(&self, kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> Output {
        kubectl(kubeconfig, args, stdin)
    }

    /// `kubectl` as the admin; panics with its stderr when it fails, returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `kubectl apply -f -` of `yaml` as the admin (server-side, so the schema judges it).
    pub fn apply(&self, yaml: &str, extra: &[&str]) -> Output {
        let mut args = vec!["apply", "--server-side", "-f", "-"];
        args.extend_from_slice(extra);
        self.kubectl_as(&self.admin, &args, Some(yaml))
    }

    /// [`Self::apply`], which must succeed.
    pub fn applied(&self, yaml: &str, extra: &[&str]) {
        let out = self.apply(yaml, extra);
        assert!(
            out.status.success(),
            "kubectl apply: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A kubeconfig for `serviceaccount` in `namespace` with a token from the TokenRequest API
    /// (`kubectl create token`), so the RBAC authorizer judges what it does.
    pub fn service_account_kubeconfig(&self, namespace: &str, serviceaccount: &str) -> PathBuf {
        let token = self.ok(&[
            "create",
            "token",
            serviceaccount,
            "-n",
            namespace,
            "--duration=1h",
        ]);
        let path = self
            .dir
            .path()
            .join(format!("{namespace}-{serviceaccount}.kubeconfig"));
        write_kubeconfig(
            &path,
            &self.server,
            &self.dir.path().join("ca.crt"),
            token.trim(),
        );
        path
    }

    /// The audit log's entries (one JSON object per request).
    pub fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.audit_log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Stops the API server (etcd keeps running) and starts it again on the same port, e.g. to
    /// cut every watch.
    pub fn restart_apiserver(&mut self) {
        let _ = self.apiserver.kill();
        let _ = self.apiserver.wait();
        self.apiserver = spawn(
            &binaries().join("kube-apiserver"),
            &self.apiserver_args,
            &self.dir.path().join("apiserver.log"),
        );
        self.wait_ready(Duration::from_secs(120));
    }

    /// etcd's client URL.
    pub fn etcd_url(&self) -> &str {
        self.etcd_args[2]
            .strip_prefix("--listen-client-urls=")
            .unwrap_or_default()
    }
}

/// The pinned `kubectl` with `kubeconfig`.
pub fn kubectl(kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    use std::io::Write;
    let mut child = Command::new(binaries().join("kubectl"))
        .env("KUBECONFIG", kubeconfig)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl runs");
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("kubectl reads stdin");
    }
    child.wait_with_output().expect("kubectl ends")
}

fn spawn(bin: &Path, args: &[String], log: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("{} starts: {e}", bin.display()))
}

fn write_kubeconfig(path: &Path, server: &str, ca: &Path, token: &str) {
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\nusers:\n- name: user\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: user\n    namespace: default\ncurrent-context: test\n",
        ca = ca.display()
    );
    std::fs::write(path, text).expect("kubeconfig");
}
