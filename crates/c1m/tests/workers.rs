//! Integration tests of the multi-process server (`c1m serve --workers N`).

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{children_of, tcp_sockets, Server};
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(server: &Server) -> Ws {
    tokio_tungstenite::connect_async(server.url("/"))
        .await
        .expect("upgrade")
        .0
}

/// Collects the stamps a client receives until `until`; `None` if its connection ended.
async fn stamps_until(mut ws: Ws, until: tokio::time::Instant) -> Option<BTreeSet<u64>> {
    let mut stamps = BTreeSet::new();
    loop {
        match tokio::time::timeout_at(until, ws.next()).await {
            Err(_) => return Some(stamps),
            Ok(Some(Ok(Message::Text(t)))) => {
                stamps.insert(t.parse().expect("decimal stamp"));
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(_))) | Ok(None) => return None,
        }
    }
}

/// The workers of `server` and the sockets each holds before any client connects
/// (listener, control channel, signal pipe).
fn workers_at_rest(server: &Server) -> (Vec<u32>, Vec<usize>) {
    std::thread::sleep(Duration::from_millis(300));
    let workers = children_of(server.child.id());
    let baseline = workers.iter().map(|&p| tcp_sockets(p)).collect();
    (workers, baseline)
}

/// Waits until the workers hold `n` client connections in total; returns each one's.
fn wait_for_sockets(workers: &[u32], baseline: &[usize], n: usize) -> Vec<usize> {
    for _ in 0..100 {
        let counts: Vec<usize> = workers
            .iter()
            .zip(baseline)
            .map(|(&p, &b)| tcp_sockets(p).saturating_sub(b))
            .collect();
        if counts.iter().sum::<usize>() >= n {
            return counts;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("workers never held {n} connections");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_stamp_reaches_every_connection_across_workers() {
    const CLIENTS: usize = 1500;
    let server = Server::start(&[
        "--workers",
        "3",
        "--interval",
        "200ms",
        "--total",
        &CLIENTS.to_string(),
    ]);
    let (workers, baseline) = workers_at_rest(&server);
    assert_eq!(workers.len(), 3, "{workers:?}");
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(connect(&server).await);
    }
    let counts = wait_for_sockets(&workers, &baseline, CLIENTS);
    assert!(
        counts.iter().filter(|&&c| c > 0).count() >= 2,
        "connections spread over workers: {counts:?}"
    );

    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                let mut got = Vec::new();
                while got.len() < 3 {
                    let msg = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
                    if let Ok(Some(Ok(Message::Text(t)))) = msg {
                        got.push(t.parse::<u64>().unwrap());
                    } else if msg.is_err() {
                        panic!("no broadcast within 5 s");
                    }
                }
                got
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.push(t.await.unwrap());
    }
    assert!(
        all.iter().all(|s| s == &all[0]),
        "every connection got the same stamps, whatever its worker"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_is_respawned_and_other_workers_lose_nothing() {
    const CLIENTS: usize = 300;
    let server = Server::start(&["--workers", "3", "--interval", "100ms"]);
    let (workers, baseline) = workers_at_rest(&server);
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(connect(&server).await);
    }
    let counts = wait_for_sockets(&workers, &baseline, CLIENTS);
    let (victim_index, _) = counts.iter().enumerate().max_by_key(|(_, c)| **c).unwrap();
    let victim = workers[victim_index];

    let until = tokio::time::Instant::now() + Duration::from_millis(1500);
    // Compare the broadcasts stamped well inside the window: earlier ones reached only
    // the clients connected by then, and the last one may straddle the deadline.
    let window = common::now_ms() + 50..common::now_ms() + 1100;
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|ws| tokio::spawn(stamps_until(ws, until)))
        .collect();
    tokio::time::sleep(Duration::from_millis(400)).await;
    // SAFETY: kill(2) on a worker process of the server this test started.
    unsafe { libc::kill(victim as i32, libc::SIGKILL) };

    let mut survivors = Vec::new();
    let mut dropped = 0;
    for t in tasks {
        match t.await.unwrap() {
            Some(stamps) => survivors.push(stamps),
            None => dropped += 1,
        }
    }
    assert_eq!(
        dropped, counts[victim_index],
        "exactly the killed worker's clients were cut off"
    );
    assert!(!survivors.is_empty());
    let in_window = |s: &BTreeSet<u64>| -> Vec<u64> {
        s.iter().copied().filter(|t| window.contains(t)).collect()
    };
    let reference = in_window(&survivors[0]);
    assert!(
        reference.len() >= 8,
        "broadcasts kept coming: {reference:?}"
    );
    for s in &survivors {
        assert_eq!(
            in_window(s),
            reference,
            "no surviving client missed a broadcast"
        );
    }

    // A replacement worker is running, and new clients are served.
    let mut now_workers = Vec::new();
    for _ in 0..50 {
        now_workers = children_of(server.child.id());
        if now_workers.len() == 3 && !now_workers.contains(&victim) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(now_workers.len(), 3, "{now_workers:?}");
    assert!(!now_workers.contains(&victim));
    for _ in 0..20 {
        let mut ws = connect(&server).await;
        let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(matches!(msg, Message::Text(_)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_is_enforced_with_503_across_workers() {
    let server = Server::start(&[
        "--workers",
        "2",
        "--connect-only",
        "--max-connections",
        "10",
    ]);
    let mut held = Vec::new();
    for _ in 0..10 {
        held.push(connect(&server).await);
    }
    // Workers publish their counts at every loop turn; give them a moment.
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..5 {
        match tokio_tungstenite::connect_async(server.url("/")).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 503)
            }
            other => panic!("expected 503, got {:?}", other.map(|(_, r)| r.status())),
        }
    }
    // Room again after one leaves.
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(300)).await;
    connect(&server).await;
}

#[tokio::test]
async fn sigterm_drains_every_worker() {
    let mut server = Server::start(&["--workers", "3", "--connect-only"]);
    let workers = children_of(server.child.id());
    assert_eq!(workers.len(), 3);
    let status = tokio::task::spawn_blocking(move || server.terminate())
        .await
        .unwrap();
    assert!(status.success());
    for pid in workers {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .map_or(true, |s| s.contains(") Z ")),
            "worker {pid} still running"
        );
    }
}
