//! Every timer and bound of a client connection and of an upstream exchange, in one struct.
//!
//! The table below ([`Limits::TABLE`]) is the single source of the command-line flags (their
//! names, help and defaults: `fleetlb run --help`) and of the reference in `docs/limits.md`
//! ([`Limits::markdown`]). Defaults follow ALB and nginx where they agree (60 s idle and
//! body gaps, 1 KiB/s minimum rates) and Envoy's circuit breakers for upstream bounds.
//!
//! The blame rule, stated once: only what a backend did counts against it: its time from the
//! last request byte written to its response head, its 5xx (but not `501`/`505`, which answer
//! the client's method or version), a connection it refused, reset or stalled. A client's
//! malformed, slow or abandoned request, a full queue, and the proxy's own exhaustion (file
//! descriptors, ports, buffers) are answered by fleetlb (4xx/503) and never touch an
//! endpoint's estimate, failure count, health or ejection.

use std::time::Duration;

/// A value a limit can take: parsed from a flag, shown as a default.
pub trait LimitValue: Sized {
    /// Parses a flag's value; the error says what is expected.
    fn parse(s: &str) -> Result<Self, String>;
    /// The value as a flag would take it.
    fn show(&self) -> String;
}

impl LimitValue for Duration {
    fn parse(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a duration: a number with ms, s, m or h (e.g. 10s)");
        let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let (n, unit) = s.split_at(split);
        let n: u64 = n.parse().map_err(|_| bad())?;
        let d = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            _ => return Err(bad()),
        };
        if d.is_zero() || d > Duration::from_secs(7 * 86_400) {
            return Err(format!("{s:?} must be between 1ms and 7 days"));
        }
        Ok(d)
    }

    fn show(&self) -> String {
        let ms = self.as_millis();
        if ms.is_multiple_of(3_600_000) {
            format!("{}h", ms / 3_600_000)
        } else if ms.is_multiple_of(60_000) && ms >= 60_000 * 5 {
            format!("{}m", ms / 60_000)
        } else if ms.is_multiple_of(1000) {
            format!("{}s", ms / 1000)
        } else {
            format!("{ms}ms")
        }
    }
}

impl LimitValue for u32 {
    fn parse(s: &str) -> Result<Self, String> {
        match s.parse::<u32>() {
            Ok(n) if (1..=10_000_000).contains(&n) => Ok(n),
            _ => Err(format!("{s:?} must be a whole number from 1 to 10000000")),
        }
    }

    fn show(&self) -> String {
        self.to_string()
    }
}

/// One row of [`Limits::TABLE`].
pub struct LimitDoc {
    /// The command-line flag, without `--`.
    pub flag: &'static str,
    /// What it bounds.
    pub help: &'static str,
    /// What it stops.
    pub stops: &'static str,
}

macro_rules! limits {
    ($( $(#[doc = $help:literal])+ $field:ident : $ty:ty = $default:expr, $flag:literal, $stops:literal; )*) => {
        /// Timers and bounds of client connections and upstream exchanges (see the module).
        #[derive(Clone, Debug, PartialEq)]
        pub struct Limits {
            $( $(#[doc = $help])+ pub $field: $ty, )*
        }

        impl Default for Limits {
            fn default() -> Self {
                Self { $( $field: $default, )* }
            }
        }

        impl Limits {
            /// Every limit: flag, help and what it stops, in the order of `--help`.
            pub const TABLE: &'static [LimitDoc] = &[
                $( LimitDoc { flag: $flag, help: concat!($($help),+).trim_ascii(), stops: $stops }, )*
            ];

            /// The value of the limit behind `flag`, as the flag takes it.
            pub fn show(&self, flag: &str) -> Option<String> {
                match flag {
                    $( $flag => Some(LimitValue::show(&self.$field)), )*
                    _ => None,
                }
            }

            /// Sets the limit behind `flag` from its text; the error names what is expected.
            pub fn set(&mut self, flag: &str, value: &str) -> Result<(), String> {
                match flag {
                    $( $flag => { self.$field = LimitValue::parse(value)?; Ok(()) } )*
                    _ => Err(format!("no limit named --{flag}")),
                }
            }
        }
    };
}

limits! {
    /// Time a client has to send a whole request head, from its first byte (also a partial
    /// HTTP/2 preface, and the first request after a TLS handshake, which the handshake's own
    /// time counts toward).
    head_timeout: Duration = Duration::from_secs(10), "client-head-timeout",
        "slowloris; connections that hold a slot without ever sending a request";
    /// Longest gap between two reads of a client's request body.
    body_timeout: Duration = Duration::from_secs(60), "client-body-timeout",
        "a stalled upload";
    /// Longest gap between two writes of a response to a client that is not reading it.
    send_timeout: Duration = Duration::from_secs(60), "client-send-timeout",
        "slow or stalled readers";
    /// Slowest a request body may arrive, or a response be read, in bytes per second averaged
    /// over 10 s windows.
    min_rate: u32 = 1024, "client-min-rate",
        "one byte per period (R-U-D-Y, slow read)";
    /// Time an idle keep-alive connection (HTTP/1.1 or HTTP/2; pings are not activity) is kept.
    keepalive_timeout: Duration = Duration::from_secs(60), "client-keepalive-timeout",
        "idle connections, ping-only HTTP/2 connections";
    /// Open client connections at most, over every listener; more get a 503 and a close.
    max_connections: u32 = 10_000, "max-connections",
        "connection floods exhausting descriptors";
    /// Largest request head accepted; larger ones get 431.
    max_header_bytes: u32 = 65_536, "max-header-bytes",
        "oversized heads";
    /// Concurrent streams per HTTP/2 connection.
    h2_max_streams: u32 = 128, "h2-max-streams",
        "one connection opening unbounded streams";
    /// Streams an HTTP/2 client may reset in 10 s (or more than it completes) before the
    /// connection gets a GOAWAY and is closed.
    h2_max_resets: u32 = 100, "h2-max-resets",
        "rapid reset (CVE-2023-44487)";
    /// Requests of one client connection in flight to backends at once; more wait in the
    /// endpoint queue's time and then get a 503 (gRPC calls: RESOURCE_EXHAUSTED).
    max_upstream_per_connection: u32 = 100, "max-upstream-per-connection",
        "one connection fanning out to many upstream connections";
    /// Time allowed to open an upstream connection.
    connect_timeout: Duration = Duration::from_secs(1), "upstream-connect-timeout",
        "unreachable backends";
    /// Longest gap between two reads of a backend's response body (a route's
    /// `spec.timeouts.bodyIdleSeconds` overrides it).
    upstream_body_timeout: Duration = Duration::from_secs(60), "upstream-body-timeout",
        "a backend stalled mid-body";
    /// Requests in flight to one endpoint at once, each on its own upstream connection
    /// (HAProxy's `maxconn`, Envoy's `max_connections`).
    endpoint_max_connections: u32 = 1024, "endpoint-max-connections",
        "fan-out onto one backend";
    /// Requests waiting for a connection slot of one endpoint; more get a 503 at once.
    endpoint_queue: u32 = 1024, "endpoint-queue",
        "unbounded queues";
    /// Longest wait in an endpoint's queue before a 503 (HAProxy's `timeout queue`).
    endpoint_queue_timeout: Duration = Duration::from_secs(1), "endpoint-queue-timeout",
        "requests waiting forever behind a full backend";
    /// Longest a WebSocket tunnel may go without a byte either way.
    tunnel_idle_timeout: Duration = Duration::from_secs(60), "tunnel-idle-timeout",
        "forgotten WebSocket tunnels";
    /// Time given to requests and tunnels in flight on shutdown; the rest are closed.
    drain_timeout: Duration = Duration::from_secs(30), "drain-timeout",
        "a shutdown that never ends";
}

impl Limits {
    /// The limits as a Markdown table (`docs/limits.md` holds it; a test keeps them equal).
    pub fn markdown() -> String {
        let defaults = Limits::default();
        let mut out = String::from("| flag | default | bounds | stops |\n|---|---|---|---|\n");
        for row in Self::TABLE {
            let help = row.help.split_whitespace().collect::<Vec<_>>().join(" ");
            out.push_str(&format!(
                "| `--{}` | {} | {} | {} |\n",
                row.flag,
                defaults.show(row.flag).unwrap_or_default(),
                help,
                row.stops
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_flag_round_trips_its_default() {
        let d = Limits::default();
        for row in Limits::TABLE {
            let shown = d.show(row.flag).expect("a value");
            let mut l = Limits::default();
            l.set(row.flag, &shown).expect("its own default parses");
            assert_eq!(l, d, "--{}", row.flag);
        }
    }

    #[test]
    fn bad_values_say_what_is_expected() {
        let mut l = Limits::default();
        assert!(
            l.set("client-head-timeout", "10")
                .unwrap_err()
                .contains("duration")
        );
        assert!(l.set("client-head-timeout", "0s").is_err());
        assert!(
            l.set("endpoint-queue", "-1")
                .unwrap_err()
                .contains("whole number")
        );
        l.set("client-head-timeout", "250ms").unwrap();
        assert_eq!(l.head_timeout, Duration::from_millis(250));
    }
}
