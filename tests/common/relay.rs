//! A TCP relay on loopback whose connections a test can cut, as a network fault between the
//! operator and an agent would: every open connection is dropped at once, new ones go
//! through again.

use std::sync::{Arc, Mutex};

use tokio::task::JoinHandle;

pub struct Relay {
    /// Where to dial instead of the target.
    pub address: std::net::SocketAddr,
    /// The copy tasks of the open connections.
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    /// While set, new connections are closed at once: the network is down.
    down: Arc<std::sync::atomic::AtomicBool>,
    accept: JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

impl Relay {
    /// A relay to `target`, on the runtime of the caller.
    pub fn start(target: String) -> Relay {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let address = listener.local_addr().unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let down: Arc<std::sync::atomic::AtomicBool> = Arc::default();
        let (open, refuse) = (connections.clone(), down.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if refuse.load(std::sync::atomic::Ordering::SeqCst) {
                    continue;
                }
                let target = target.clone();
                let copy = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                let mut open = open.lock().unwrap();
                open.retain(|c| !c.is_finished());
                open.push(copy);
            }
        });
        Relay {
            address,
            connections,
            down,
            accept,
        }
    }

    /// Takes the network down (every open connection cut, new ones closed at once) or brings
    /// it back up.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, std::sync::atomic::Ordering::SeqCst);
        if down {
            self.cut();
        }
    }

    /// Drops every open connection (both ends see them reset); returns how many there were.
    pub fn cut(&self) -> usize {
        let mut open = self.connections.lock().unwrap();
        let live: Vec<JoinHandle<()>> = open.drain(..).filter(|c| !c.is_finished()).collect();
        for connection in &live {
            connection.abort();
        }
        live.len()
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.connections
            .lock()
            .unwrap()
            .iter()
            .filter(|c| !c.is_finished())
            .count()
    }
}
