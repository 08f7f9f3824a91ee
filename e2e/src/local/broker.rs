//! A Kafka-protocol broker (tansu, SQLite storage) on an ephemeral loopback
//! port, in a scratch directory; stopped when dropped.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Broker {
    child: Child,
    pub addr: String,
    _dir: tempfile::TempDir,
}

impl Broker {
    pub async fn start(bin: &str) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = super::procs::free_port()?;
        let url = format!("tcp://127.0.0.1:{port}");
        let log = std::fs::File::create(dir.path().join("broker.log"))?;
        let mut child = Command::new(bin)
            .args(["broker", "--listener-url", &url])
            .args(["--advertised-listener-url", &url])
            .args(["--storage-engine", "sqlite://broker.db"])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        let addr = format!("127.0.0.1:{port}");
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(&addr).await.is_ok() {
                return Ok(Self {
                    child,
                    addr,
                    _dir: dir,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        anyhow::bail!("tansu did not listen on {addr}")
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
