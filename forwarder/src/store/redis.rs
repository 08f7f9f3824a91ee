//! The Redis backend: atomic claims as Lua scripts over one value per key
//! (`C<token><fingerprint>` while claimed, `R<blob>` when completed), each
//! with its expiry. Every call is bounded by `store.redis.timeout`; the
//! connection is made in the background and re-made by the connection
//! manager, so a Redis outage fails calls fast and never stalls a request.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::RwLock;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;

use super::backend::{Backend, RateState, RawClaimed, Token};
use super::error::StoreError;
use super::key::Fingerprint;
use forwarder_config::RedisConfig;

const CLAIM: &str = r"
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], 'C' .. ARGV[1] .. ARGV[2], 'PX', ARGV[3])
  return {0, ''}
end
return {1, v}
";

const RENEW: &str = r"
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, 17) == 'C' .. ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
";

const COMPLETE: &str = r"
local v = redis.call('GET', KEYS[1])
if (not v) or string.sub(v, 1, 17) == 'C' .. ARGV[1] then
  redis.call('SET', KEYS[1], 'R' .. ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
";

const ABANDON: &str = r"
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, 17) == 'C' .. ARGV[1] then
  redis.call('DEL', KEYS[1])
end
return 0
";

/// GCRA in microseconds of Redis's own clock, so replicas' clocks do not matter.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval * cost
local allow_at = new_tat - interval * burst
if now < allow_at then
  return {0, 0, allow_at - now, tat - now}
end
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.max(1, math.ceil((new_tat - now) / 1000)))
return {1, math.floor((now + interval * burst - new_tat) / interval), 0, new_tat - now}
";

/// Budget counters: increment every key, then check each limit (-1: none);
/// a checked call past a limit is undone whole. A key's expiry is set at
/// its first use. ARGV: check, then delta, limit, ttl_ms per key.
const COUNTERS: &str = r"
local check = ARGV[1] == '1'
local vals = {}
local over = false
for i = 1, #KEYS do
  local delta = tonumber(ARGV[3 * i - 1])
  local limit = tonumber(ARGV[3 * i])
  local v = redis.call('INCRBY', KEYS[i], delta)
  if redis.call('PTTL', KEYS[i]) < 0 then
    redis.call('PEXPIRE', KEYS[i], ARGV[3 * i + 1])
  end
  vals[i] = v
  if check and limit >= 0 and v > limit then over = true end
end
if over then
  for i = 1, #KEYS do
    vals[i] = redis.call('DECRBY', KEYS[i], ARGV[3 * i - 1])
  end
  return {0, unpack(vals)}
end
return {1, unpack(vals)}
";

struct Scripts {
    counters: Script,
    gcra: Script,
    claim: Script,
    renew: Script,
    complete: Script,
    abandon: Script,
}

pub struct RedisBackend {
    conn: Arc<RwLock<Option<ConnectionManager>>>,
    prefix: String,
    timeout: Duration,
    scripts: Scripts,
    /// Ends the background connect loop with the backend.
    _connector: tokio_util::task::AbortOnDropHandle<()>,
}

fn millis(d: Duration) -> u64 {
    d.as_millis().clamp(1, u64::MAX as u128) as u64
}

/// The client for `cfg`; the password is read from its file.
pub fn client(cfg: &RedisConfig) -> Result<redis::Client, String> {
    use redis::IntoConnectionInfo;
    let mut info = cfg
        .url
        .as_str()
        .into_connection_info()
        .map_err(|e| format!("store.redis.url: {}", e.category()))?;
    let mut redis_info = info.redis_settings().clone().set_db(cfg.db);
    if let Some(user) = &cfg.username {
        redis_info = redis_info.set_username(user);
    }
    if let Some(path) = &cfg.password_file {
        let pw = std::fs::read_to_string(path)
            .map_err(|e| format!("store.redis.password_file {}: {e}", path.display()))?;
        redis_info = redis_info.set_password(pw.trim_end_matches(['\r', '\n']));
    }
    info = info.set_redis_settings(redis_info);
    if cfg.ca_file.is_none() && cfg.client_cert_file.is_none() {
        return redis::Client::open(info).map_err(|e| format!("store.redis: {}", e.category()));
    }
    let read = |field: &str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| format!("store.redis.{field} {}: {e}", path.display()))
    };
    let client_tls = match (&cfg.client_cert_file, &cfg.client_key_file) {
        (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
            client_cert: read("client_cert_file", cert)?,
            client_key: read("client_key_file", key)?,
        }),
        _ => None,
    };
    let root_cert = cfg
        .ca_file
        .as_deref()
        .map(|p| read("ca_file", p))
        .transpose()?;
    let certs = redis::TlsCertificates {
        client_tls,
        root_cert,
    };
    redis::Client::build_with_tls(info, certs)
        .map_err(|e| format!("store.redis (TLS): {}", e.category()))
}

impl RedisBackend {
    /// Starts connecting in the background; calls fail as unavailable
    /// until the first connection is made.
    pub fn start(cfg: &RedisConfig) -> Result<Self, String> {
        let client = client(cfg)?;
        let rt = tokio::runtime::Handle::try_current()
            .map_err(|_| "the redis store needs a tokio runtime".to_string())?;
        let conn = Arc::new(RwLock::new(None));
        let slot = conn.clone();
        let mgr_cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(cfg.connect_timeout))
            .set_response_timeout(Some(cfg.timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let connect_timeout = cfg.connect_timeout;
        let connector = rt.spawn(async move {
            let mut backoff = Duration::from_millis(50);
            loop {
                match ConnectionManager::new_with_config(client.clone(), mgr_cfg.clone()).await {
                    Ok(c) => {
                        tracing::info!("store: connected to redis");
                        *slot.write() = Some(c);
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e.category(), "store: cannot connect to redis yet; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(connect_timeout.max(Duration::from_secs(1)));
                    }
                }
            }
        });
        Ok(Self {
            conn,
            prefix: format!("{}:", cfg.key_prefix),
            timeout: cfg.timeout,
            scripts: Scripts {
                counters: Script::new(COUNTERS),
                gcra: Script::new(GCRA),
                claim: Script::new(CLAIM),
                renew: Script::new(RENEW),
                complete: Script::new(COMPLETE),
                abandon: Script::new(ABANDON),
            },
            _connector: tokio_util::task::AbortOnDropHandle::new(connector),
        })
    }

    fn key(&self, name: &str) -> String {
        let mut k = String::with_capacity(self.prefix.len() + name.len());
        k.push_str(&self.prefix);
        k.push_str(name);
        k
    }

    /// Runs `f` on the connection within the call timeout.
    async fn call<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let conn = self
            .conn
            .read()
            .clone()
            .ok_or_else(|| StoreError::Unavailable("not connected to redis".into()))?;
        match tokio::time::timeout(self.timeout, f(conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) if e.is_timeout() => Err(StoreError::Timeout(self.timeout)),
            Ok(Err(e)) => Err(StoreError::Unavailable(e.category().to_string())),
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        }
    }
}

fn record(v: Vec<u8>) -> Option<Bytes> {
    match v.first() {
        Some(b'R') => Some(Bytes::from(v).slice(1..)),
        _ => None,
    }
}

#[async_trait]
impl Backend for RedisBackend {
    async fn get(&self, name: &str) -> Result<Option<Bytes>, StoreError> {
        let key = self.key(name);
        let v: Option<Vec<u8>> = self
            .call(|mut c| async move { redis::cmd("GET").arg(key).query_async(&mut c).await })
            .await?;
        Ok(v.and_then(record))
    }

    async fn put(&self, name: &str, blob: Bytes, ttl: Duration) -> Result<(), StoreError> {
        let key = self.key(name);
        let mut value = Vec::with_capacity(1 + blob.len());
        value.push(b'R');
        value.extend_from_slice(&blob);
        self.call(|mut c| async move {
            redis::cmd("SET")
                .arg(key)
                .arg(value)
                .arg("PX")
                .arg(millis(ttl))
                .query_async::<()>(&mut c)
                .await
        })
        .await
    }

    async fn delete(&self, name: &str) -> Result<(), StoreError> {
        let key = self.key(name);
        self.call(|mut c| async move { redis::cmd("DEL").arg(key).query_async::<()>(&mut c).await })
            .await
    }

    async fn claim(
        &self,
        name: &str,
        token: Token,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<RawClaimed, StoreError> {
        let key = self.key(name);
        let mut inv = self.scripts.claim.key(key);
        inv.arg(&token[..]).arg(&fingerprint[..]).arg(millis(lease));
        let (state, v): (i64, Vec<u8>) = self
            .call(|mut c| async move { inv.invoke_async(&mut c).await })
            .await?;
        if state == 0 {
            return Ok(RawClaimed::Won);
        }
        match v.first() {
            Some(b'C') if v.len() == 1 + 16 + 32 => {
                let fp: Fingerprint = v[17..].try_into().expect("length checked");
                Ok(RawClaimed::Busy(fp))
            }
            Some(b'R') => Ok(RawClaimed::Done(Bytes::from(v).slice(1..))),
            _ => Err(StoreError::Corrupt("unrecognised value".into())),
        }
    }

    async fn claimed(&self, name: &str) -> Result<bool, StoreError> {
        let key = self.key(name);
        // The value's tag byte only: `C` is a claim, `R` a record.
        let tag: Vec<u8> = self
            .call(|mut c| async move {
                redis::cmd("GETRANGE")
                    .arg(key)
                    .arg(0)
                    .arg(0)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(tag == b"C")
    }

    async fn renew(&self, name: &str, token: Token, lease: Duration) -> Result<bool, StoreError> {
        let key = self.key(name);
        let mut inv = self.scripts.renew.key(key);
        inv.arg(&token[..]).arg(millis(lease));
        let r: i64 = self
            .call(|mut c| async move { inv.invoke_async(&mut c).await })
            .await?;
        Ok(r == 1)
    }

    async fn complete(
        &self,
        name: &str,
        token: Token,
        blob: Bytes,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let key = self.key(name);
        let mut inv = self.scripts.complete.key(key);
        inv.arg(&token[..]).arg(blob.as_ref()).arg(millis(ttl));
        let r: i64 = self
            .call(|mut c| async move { inv.invoke_async(&mut c).await })
            .await?;
        Ok(r == 1)
    }

    async fn gcra(
        &self,
        name: &str,
        interval_us: u64,
        burst: u64,
        cost: u64,
    ) -> Result<RateState, StoreError> {
        let key = self.key(name);
        let mut inv = self.scripts.gcra.key(key);
        inv.arg(interval_us).arg(burst).arg(cost);
        let (allowed, remaining, retry_after_us, reset_us): (i64, i64, i64, i64) = self
            .call(|mut c| async move { inv.invoke_async(&mut c).await })
            .await?;
        Ok(RateState {
            allowed: allowed == 1,
            remaining: remaining.max(0) as u64,
            retry_after_us: retry_after_us.max(0) as u64,
            reset_us: reset_us.max(0) as u64,
        })
    }

    async fn add(
        &self,
        names: &[String],
        ops: &[super::backend::CounterOp],
        check: bool,
    ) -> Result<(bool, Vec<i64>), StoreError> {
        let mut inv = self.scripts.counters.prepare_invoke();
        for n in names {
            inv.key(self.key(n));
        }
        inv.arg(if check { "1" } else { "0" });
        for op in ops {
            inv.arg(op.delta)
                .arg(op.limit.unwrap_or(-1))
                .arg(millis(op.ttl));
        }
        let r: Vec<i64> = self
            .call(|mut c| async move { inv.invoke_async(&mut c).await })
            .await?;
        match r.split_first() {
            Some((stood, values)) if values.len() == names.len() => {
                Ok((*stood == 1, values.to_vec()))
            }
            _ => Err(StoreError::Unavailable(
                "redis answered the counter script with a malformed reply".into(),
            )),
        }
    }

    async fn index_add(
        &self,
        name: &str,
        member: &str,
        score: u64,
        drop_below: u64,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let key = self.key(name);
        let member = member.to_string();
        self.call(|mut c| async move {
            redis::pipe()
                .atomic()
                .cmd("ZADD")
                .arg(&key)
                .arg(score)
                .arg(&member)
                .ignore()
                .cmd("ZREMRANGEBYSCORE")
                .arg(&key)
                .arg("-inf")
                .arg(format!("({drop_below}"))
                .ignore()
                .cmd("PEXPIRE")
                .arg(&key)
                .arg(millis(ttl))
                .ignore()
                .query_async::<()>(&mut c)
                .await
        })
        .await
    }

    async fn index_list(&self, name: &str, limit: usize) -> Result<Vec<(String, u64)>, StoreError> {
        let key = self.key(name);
        let stop = i64::try_from(limit).unwrap_or(i64::MAX).max(1) - 1;
        self.call(|mut c| async move {
            redis::cmd("ZRANGE")
                .arg(key)
                .arg(0)
                .arg(stop)
                .arg("WITHSCORES")
                .query_async::<Vec<(String, u64)>>(&mut c)
                .await
        })
        .await
    }

    async fn index_remove(&self, name: &str, member: &str) -> Result<(), StoreError> {
        let key = self.key(name);
        let member = member.to_string();
        self.call(|mut c| async move {
            redis::cmd("ZREM")
                .arg(key)
                .arg(member)
                .query_async::<()>(&mut c)
                .await
        })
        .await
    }

    async fn abandon(&self, name: &str, token: Token) -> Result<(), StoreError> {
        let key = self.key(name);
        let mut inv = self.scripts.abandon.key(key);
        inv.arg(&token[..]);
        let _: i64 = self
            .call(|mut c| async move { inv.invoke_async(&mut c).await })
            .await?;
        Ok(())
    }
}
