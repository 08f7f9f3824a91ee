//! Leader election between two electors on a real API server (envtest),
//! with the faults that let two leaders act at once when expiry is judged on
//! wall clocks or the renew deadline counts from a renewal's answer: a
//! skewed clock, and renewals that spend seconds in flight.
//!
//! Without `KUBEBUILDER_ASSETS` these tests are reported as ignored.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::Client;
use operator::leader::{Election, LeaderConfig};

/// The admin client and a fresh namespace for the lease.
async fn setup(prefix: &str) -> (Client, String) {
    let cp = envtest::control_plane();
    let client = cp.client().await;
    let ns = cp.namespace(&client, prefix).await;
    (client, ns)
}

/// Short timings, so a test takes seconds: lease 6 s, deadline 4 s.
fn cfg(ns: &str, id: &str) -> LeaderConfig {
    LeaderConfig {
        lease_duration: Duration::from_secs(6),
        renew_deadline: Duration::from_secs(4),
        retry_period: Duration::from_millis(500),
        ..LeaderConfig::new("operator".into(), ns.into(), id.into())
    }
}

fn an_hour_slow() -> jiff::Timestamp {
    jiff::Timestamp::now() - jiff::SignedDuration::from_hours(1)
}

fn is_lease_write(req: &http::Request<kube::client::Body>) -> bool {
    req.method() == http::Method::PATCH && req.uri().path().contains("/leases/")
}

/// Delays the answers to lease writes by `answer_delay_ms` (the write
/// itself lands at once), then cuts the client off: one renewal that is
/// answered seconds late, and nothing after it.
#[derive(Clone, Default)]
struct Faults {
    cut: Arc<AtomicBool>,
    request_delay_ms: Arc<AtomicU64>,
    answer_delay_ms: Arc<AtomicU64>,
}

struct SlowAnswers<S> {
    inner: S,
    faults: Faults,
}

impl<S> tower::Service<http::Request<kube::client::Body>> for SlowAnswers<S>
where
    S: tower::Service<http::Request<kube::client::Body>>,
    S::Future: Send + 'static,
    S::Response: Send,
    S::Error: Send,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<kube::client::Body>) -> Self::Future {
        let delay = if is_lease_write(&req) {
            self.faults.answer_delay_ms.load(Ordering::SeqCst)
        } else {
            0
        };
        let cut = self.faults.cut.clone();
        let answer = self.inner.call(req);
        Box::pin(async move {
            let answer = answer.await;
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
                cut.store(true, Ordering::SeqCst);
            }
            answer
        })
    }
}

/// An admin client whose requests fail while `cut` is set, whose lease
/// writes (PATCH) wait `request_delay_ms` before they leave (an API server
/// or network that takes seconds to take a renewal), and whose lease
/// writes' answers come `answer_delay_ms` late (see [`SlowAnswers`]).
async fn faulty_client(faults: &Faults) -> Client {
    let (cut, delay_ms) = (faults.cut.clone(), faults.request_delay_ms.clone());
    let config = envtest::control_plane().config().await;
    let filter =
        tower::filter::AsyncFilterLayer::new(move |req: http::Request<kube::client::Body>| {
            let cut = cut.load(Ordering::SeqCst);
            let delay = if is_lease_write(&req) {
                Duration::from_millis(delay_ms.load(Ordering::SeqCst))
            } else {
                Duration::ZERO
            };
            async move {
                if cut {
                    return Err::<_, tower::BoxError>("cut off from the API server".into());
                }
                tokio::time::sleep(delay).await;
                Ok(req)
            }
        });
    let layer = tower::ServiceBuilder::new()
        .layer(filter)
        .layer(tower::buffer::BufferLayer::new(64))
        .layer(tower::layer::layer_fn({
            let faults = faults.clone();
            move |inner| SlowAnswers {
                inner,
                faults: faults.clone(),
            }
        }));
    kube::client::ClientBuilder::try_from(config)
        .expect("client builder")
        .with_layer(&layer)
        .build()
}

/// When each of two electors' events happened, measured from `start`.
async fn first_of(
    a: &mut Election,
    b: &mut Election,
    within: Duration,
) -> (Option<Duration>, Option<Duration>) {
    let start = Instant::now();
    let (mut a_lost, mut b_leads) = (None, None);
    let deadline = tokio::time::sleep(within);
    tokio::pin!(deadline);
    while a_lost.is_none() || b_leads.is_none() {
        tokio::select! {
            _ = a.lost(), if a_lost.is_none() => a_lost = Some(start.elapsed()),
            r = b.acquired(), if b_leads.is_none() => {
                r.expect("b's election runs");
                b_leads = Some(start.elapsed());
            }
            () = &mut deadline => break,
        }
    }
    (a_lost, b_leads)
}

#[tokio::test]
#[cfg_attr(
    not(envtest),
    ignore = "set KUBEBUILDER_ASSETS: needs a real kube-apiserver"
)]
async fn a_leader_with_a_skewed_clock_keeps_its_lease_and_expires_on_observed_time() {
    let (admin, ns) = setup("leader-skew").await;
    let faults = Faults::default();
    let a_client = faulty_client(&faults).await;
    // A's wall clock is an hour slow: every renewTime it writes reads as
    // long expired on B's clock.
    let mut a = Election::start(
        a_client,
        &LeaderConfig {
            wall_clock: an_hour_slow,
            ..cfg(&ns, "a")
        },
    )
    .await
    .unwrap();
    a.acquired().await.unwrap();
    let mut b = Election::start(admin, &cfg(&ns, "b")).await.unwrap();

    // Two lease durations of A renewing: B must not lead, A must not lose.
    let (a_lost, b_leads) = first_of(&mut a, &mut b, Duration::from_secs(12)).await;
    assert_eq!(
        (a_lost, b_leads),
        (None, None),
        "while A renews, B stays standby (A lost at, B led at)"
    );

    // A is cut off: it stops within its renew deadline, and B, timing the
    // lease from when it last saw it change, leads only after that.
    faults.cut.store(true, Ordering::SeqCst);
    let (a_lost, b_leads) = first_of(&mut a, &mut b, Duration::from_secs(20)).await;
    eprintln!("after the cut: a stopped at {a_lost:?}, b led at {b_leads:?}");
    let (a_lost, b_leads) = (a_lost.expect("A stops"), b_leads.expect("B leads"));
    assert!(a_lost <= Duration::from_secs(5), "{a_lost:?}");
    assert!(
        a_lost < b_leads,
        "A stopped ({a_lost:?}) before B led ({b_leads:?})"
    );
    // B knows when it last saw A alive (the autoscaler continues a
    // stabilization window from there): at least a lease duration ago.
    let seen = b.handover().expect("B saw A's renewals");
    assert!(
        seen.elapsed() >= Duration::from_secs(6),
        "{:?}",
        seen.elapsed()
    );
    assert!(
        seen.elapsed() < Duration::from_secs(20),
        "{:?}",
        seen.elapsed()
    );
}

#[tokio::test]
#[cfg_attr(
    not(envtest),
    ignore = "set KUBEBUILDER_ASSETS: needs a real kube-apiserver"
)]
async fn a_leader_whose_renewals_are_slow_stops_before_the_standby_leads() {
    let (admin, ns) = setup("leader-slow").await;
    let faults = Faults::default();
    let a_client = faulty_client(&faults).await;
    let mut a = Election::start(a_client, &cfg(&ns, "a")).await.unwrap();
    a.acquired().await.unwrap();
    let mut b = Election::start(admin, &cfg(&ns, "b")).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!b.is_leader(), "one leader at a time");

    // Each renewal now reaches the API server 3 s after it was stamped and
    // sent (within the 4 s deadline, so it does succeed).
    faults.request_delay_ms.store(3_000, Ordering::SeqCst);
    let (a_lost, b_leads) = first_of(&mut a, &mut b, Duration::from_secs(25)).await;
    eprintln!("slow renewals: a stopped at {a_lost:?}, b led at {b_leads:?}");
    let a_lost = a_lost.expect("a leader that cannot renew within its deadline stops");
    if let Some(b_leads) = b_leads {
        assert!(
            a_lost < b_leads,
            "A stopped ({a_lost:?}) before B led ({b_leads:?})"
        );
    }
}

#[tokio::test]
#[cfg_attr(
    not(envtest),
    ignore = "set KUBEBUILDER_ASSETS: needs a real kube-apiserver"
)]
async fn a_renewal_answered_late_does_not_extend_the_leaders_time() {
    let (admin, ns) = setup("leader-late").await;
    let faults = Faults::default();
    let a_client = faulty_client(&faults).await;
    let mut a = Election::start(a_client, &cfg(&ns, "a")).await.unwrap();
    a.acquired().await.unwrap();
    let mut b = Election::start(admin, &cfg(&ns, "b")).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!b.is_leader(), "one leader at a time");

    // A's next renewal lands at once but is answered 3 s later; then A is
    // cut off. Counting its 4 s deadline from the answer, A would act until
    // 7 s after the renewal B saw, and B may lead 6 s after it.
    faults.answer_delay_ms.store(3_000, Ordering::SeqCst);
    let (a_lost, b_leads) = first_of(&mut a, &mut b, Duration::from_secs(20)).await;
    eprintln!("late answer: a stopped at {a_lost:?}, b led at {b_leads:?}");
    let (a_lost, b_leads) = (a_lost.expect("A stops"), b_leads.expect("B leads"));
    assert!(
        a_lost < b_leads,
        "A stopped ({a_lost:?}) before B led ({b_leads:?})"
    );
}
