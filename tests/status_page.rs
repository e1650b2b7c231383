//! The status page in a real browser: headless Chromium driven by chromedriver (Debian
//! `chromium`, `chromium-driver`) over the W3C WebDriver protocol, against a real `fleetlb
//! demo`. The page must list every instance, and an instance the test stops must turn red.
//! `FLEETLB_SCREENSHOT=path.png` saves what the browser shows (docs/status-page.png).

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use support::*;

/// One WebDriver command: (HTTP status, JSON answer).
fn call(driver: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let body = body.map(Value::to_string).unwrap_or_default();
    let mut s = TcpStream::connect(driver).expect("chromedriver answers");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {driver}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    // chromedriver keeps the connection open: read the head, then Content-Length bytes.
    let mut raw = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let (head, want) = loop {
        let n = s.read(&mut chunk).unwrap_or(0);
        assert!(
            n > 0,
            "chromedriver closed without an answer to {method} {path}"
        );
        raw.extend_from_slice(&chunk[..n]);
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).to_string();
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            raw.drain(..end + 4);
            break (head, len);
        }
    };
    while raw.len() < want {
        let n = s.read(&mut chunk).unwrap_or(0);
        assert!(n > 0, "chromedriver cut its answer to {method} {path}");
        raw.extend_from_slice(&chunk[..n]);
    }
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let json = serde_json::from_slice(&raw).unwrap_or(Value::Null);
    (status, json)
}

/// chromedriver on a free port, with one headless Chromium session; both end on drop.
struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: String,
}

impl Browser {
    fn start() -> Self {
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver is installed (Debian chromium-driver; .ci/test installs it)");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        eventually("chromedriver listens", || {
            TcpStream::connect(addr).ok().map(|_| ())
        });
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1300,900"]
            }
        }}});
        let (status, v) = call(addr, "POST", "/session", Some(&caps));
        assert_eq!(status, 200, "no browser session: {v}");
        let session = v["value"]["sessionId"].as_str().unwrap().to_string();
        Self {
            driver,
            addr,
            session,
        }
    }

    fn cmd(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let (status, v) = call(
            self.addr,
            method,
            &format!("/session/{}{path}", self.session),
            body,
        );
        assert_eq!(status, 200, "{method} {path}: {v}");
        v["value"].clone()
    }

    fn open(&self, url: &str) {
        self.cmd("POST", "/url", Some(&json!({ "url": url })));
    }

    /// Runs `script` in the page and returns its value.
    fn eval(&self, script: &str) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(&json!({ "script": script, "args": [] })),
        )
    }

    fn screenshot(&self, path: &str) {
        use base64::Engine as _;
        let png = self.cmd("GET", "/screenshot", None);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap())
            .unwrap();
        std::fs::write(path, bytes).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = call(
            self.addr,
            "DELETE",
            &format!("/session/{}", self.session),
            None,
        );
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Each instance row the page shows: (instance id, state, the state cell's background colour).
const ROWS: &str = "return [...document.querySelectorAll('tr[data-instance]')].map(r => \
    [r.dataset.instance, r.dataset.state, getComputedStyle(r.querySelector('td.state')).backgroundColor]);";

fn rows(b: &Browser) -> Vec<(String, String, String)> {
    b.eval(ROWS)
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let f = |i: usize| r[i].as_str().unwrap_or_default().to_string();
            (f(0), f(1), f(2))
        })
        .collect()
}

#[test]
fn the_status_page_shows_every_instance_and_a_stopped_one_turns_red() {
    let f = Fleetlb::demo(&[
        ("cluster1.yaml", example("cluster1.yaml")),
        ("cluster2.yaml", example("cluster2.yaml")),
    ]);
    // Some traffic, so rates and the latency history have something to show.
    f.wait_both_clusters_serve("both clusters serve");
    let screenshot = std::env::var("FLEETLB_SCREENSHOT").ok();
    if screenshot.is_some() {
        // For the picture: a minute of traffic, so the history has a shape.
        let end = std::time::Instant::now() + Duration::from_secs(60);
        let mut n = 0u64;
        while std::time::Instant::now() < end {
            let _ = get(
                f.proxy,
                if n.is_multiple_of(3) {
                    "/cluster2"
                } else {
                    "/cluster1"
                },
            );
            n += 1;
            std::thread::sleep(Duration::from_millis(5 + (n / 400) * 5 % 20));
        }
    }
    let b = Browser::start();
    b.open(&format!("http://{}/", f.admin));

    // Every instance the proxy knows is on the page, green.
    let known: Vec<String> = f
        .endpoints()
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| c["endpoints"].as_array().unwrap().clone())
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    assert!(known.len() >= 4, "{known:?}");
    eventually("the page lists every instance, healthy", || {
        let rows = rows(&b);
        known
            .iter()
            .all(|id| rows.iter().any(|(r, s, _)| r == id && s == "healthy"))
            .then_some(())
    });
    let green = rows(&b)[0].2.clone();

    // Stop one instance's process (SIGSTOP: it stops answering, and its process stays, so the
    // controller keeps it while its health checks fail).
    let (pid, id) = a_backend_of(f.pid(), "cluster1");
    /// Lets the stopped process go on whatever happens (a stopped process ignores SIGTERM).
    struct Stopped(u32);
    impl Drop for Stopped {
        fn drop(&mut self) {
            let _ = Command::new("kill")
                .args(["-CONT", &self.0.to_string()])
                .status();
        }
    }
    Command::new("kill")
        .args(["-STOP", &pid.to_string()])
        .status()
        .unwrap();
    let stopped = Stopped(pid);
    let red = eventually("the stopped instance turns red", || {
        rows(&b)
            .into_iter()
            .find(|(r, s, _)| *r == id && s == "unhealthy")
            .map(|(_, _, colour)| colour)
    });
    if let Some(path) = &screenshot {
        b.screenshot(path);
    }
    drop(stopped);
    // Red is red: rgb(207, 34, 46), the page's --bad; healthy was green.
    assert_eq!(red, "rgb(207, 34, 46)");
    assert_ne!(red, green);
    // The page is one self-contained document: nothing fetched from elsewhere, and nothing in
    // it that could fetch (no src/href, no URL but its own).
    // (SVG's namespace name is a URI that is never fetched.)
    let page = get(f.admin, "/")
        .unwrap()
        .body
        .replace("\"http://www.w3.org/2000/svg\"", "");
    for word in ["src=", "href=", "http://", "https://", "@import", "url("] {
        assert!(
            !page.contains(word),
            "the status page refers outside: {word}"
        );
    }
    let external = b.eval(
        "return performance.getEntriesByType('resource').map(e => e.name).filter(n => !n.startsWith(location.origin));",
    );
    assert_eq!(external, json!([]), "the page loaded outside assets");
}
