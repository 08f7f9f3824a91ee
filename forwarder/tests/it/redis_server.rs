//! A real `redis-server` (the Debian package) for one test: started on an
//! ephemeral loopback port in a temporary directory, killed when dropped.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use forwarder::config::{EncryptionConfig, RedisConfig, StoreBackend, StoreConfig};

pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    pub dir: tempfile::TempDir,
    /// Extra server arguments (a TLS port, say), kept for restarts.
    args: Vec<String>,
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

impl RedisServer {
    pub async fn start() -> Self {
        Self::start_with(Vec::new()).await
    }

    /// With extra `redis-server` arguments; the plain port stays open for
    /// the readiness check and the test's own inspection.
    pub async fn start_with(args: Vec<String>) -> Self {
        let mut s = Self {
            child: None,
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            args,
        };
        s.spawn().await;
        s
    }

    /// With every write on disk before it is acknowledged (AOF, fsync
    /// always), so a `kill -9` and a restart lose nothing acknowledged.
    pub async fn start_durable() -> Self {
        Self::start_with(
            ["--appendonly", "yes", "--appendfsync", "always"]
                .map(String::from)
                .to_vec(),
        )
        .await
    }

    /// A free loopback port (for a TLS port next to the plain one).
    pub fn free_port() -> u16 {
        free_port()
    }

    async fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs");
        self.child = Some(child);
        let client = redis::Client::open(self.url()).unwrap();
        for _ in 0..200 {
            if let Ok(mut c) = client.get_multiplexed_async_connection().await {
                if redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .is_ok()
                {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("redis-server did not start on port {}", self.port);
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL: an outage, not a shutdown).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port (empty: nothing was persisted).
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// A store config on this server, sealed with the key ring at `keys`.
    pub fn store_config(&self, keys: Option<&std::path::Path>) -> StoreConfig {
        StoreConfig {
            backend: StoreBackend::Redis,
            redis: Some(RedisConfig {
                url: self.url(),
                timeout: Duration::from_millis(250),
                connect_timeout: Duration::from_millis(500),
                allow_plaintext: keys.is_none(),
                ..Default::default()
            }),
            encryption: keys.map(|k| EncryptionConfig {
                key_file: k.to_path_buf(),
                reload_interval: Duration::from_millis(100),
            }),
            ..Default::default()
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Writes a key ring file with the given `(id, byte)` keys (32 × byte).
pub fn write_keys(path: &std::path::Path, keys: &[(&str, u8)]) {
    use base64::Engine;
    let text: String = keys
        .iter()
        .map(|(id, b)| {
            format!(
                "{id}: {}\n",
                base64::engine::general_purpose::STANDARD.encode([*b; 32])
            )
        })
        .collect();
    std::fs::write(path, text).unwrap();
}
