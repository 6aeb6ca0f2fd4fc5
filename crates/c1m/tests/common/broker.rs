//! Brokers for cluster tests: `nats-server` (plain or JetStream) and `redis-server`
//! on loopback ports, started and stopped by the test.

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A broker process we started, killed when dropped (with its JetStream store).
pub struct Broker {
    pub child: Child,
    pub port: u16,
    pub kind: &'static str,
    store: Option<std::path::PathBuf>,
}

impl Broker {
    /// `kind`: "nats", "jetstream" (nats-server -js, its store in a fresh directory) or
    /// "redis".
    pub fn start(kind: &'static str, port: u16) -> Broker {
        let store = (kind == "jetstream").then(|| {
            std::env::temp_dir().join(format!("c1m-jetstream-{port}-{}", std::process::id()))
        });
        Broker::start_with(kind, port, store)
    }

    pub fn start_with(kind: &'static str, port: u16, store: Option<std::path::PathBuf>) -> Broker {
        let port_arg = port.to_string();
        let store_arg = store
            .as_ref()
            .map(|dir| dir.display().to_string())
            .unwrap_or_default();
        let (program, args): (&str, Vec<&str>) = match kind {
            "nats" => ("nats-server", vec!["-a", "127.0.0.1", "-p", &port_arg]),
            "jetstream" => (
                "nats-server",
                vec!["-a", "127.0.0.1", "-p", &port_arg, "-js", "-sd", &store_arg],
            ),
            _ => (
                "redis-server",
                vec![
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    &port_arg,
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ],
            ),
        };
        let child = Command::new(program)
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("{program} is needed for this test ({e}); .ci/run installs it (apt-get install nats-server redis-server)")
            });
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "{program} did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Broker {
            child,
            port,
            kind,
            store,
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.kind == "jetstream" {
            "nats"
        } else {
            self.kind
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Kills the broker and starts it again on the same port (JetStream: with the same
    /// store, as a restarted server finds its files).
    pub fn restart(mut self) -> Broker {
        let _ = self.child.kill();
        let _ = self.child.wait();
        Broker::start_with(self.kind, self.port, self.store.take())
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(store) = &self.store {
            let _ = std::fs::remove_dir_all(store);
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
