//! Request deadlines without a tokio timer each.
//!
//! Every attempt waits for its backend's answer under `proxy.request_timeout`, and a client
//! connection with a task is watched for idleness every `proxy.client_idle_timeout` (a
//! keep-alive connection gets a task, so a watch, for each request). A tokio timer for each is
//! registered in the runtime's timer wheel (behind its lock) when first polled and taken out
//! when dropped: about 870 instructions a request for the attempt's alone, 4 % of a proxied
//! request's user-space work (callgrind, one epoll worker). Here each data-plane worker keeps
//! a wheel of its own: a deadline is an entry in a vector and in a bucket (insertion and
//! removal touch nothing else), and one ticker task per worker sleeps until the earliest
//! pending deadline's tick (a turn of the wheel at the most) and fires what is due.
//!
//! A deadline never fires early and at most one [`TICK`] late (plus however late the worker
//! gets to its ticker); these timeouts are hundreds of milliseconds at the least. Off a worker
//! (a test's runtime, say) a deadline is a tokio timer.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// The wheel's resolution: a deadline fires when the first tick boundary at or after it is
/// swept.
pub const TICK: Duration = Duration::from_millis(10);
const TICK_NANOS: u64 = TICK.as_nanos() as u64;
/// Buckets of the wheel: a turn is `SLOTS` ticks (2.56 s); a later deadline waits in its bucket
/// for its turn.
const SLOTS: u64 = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Free,
    Pending,
    Fired,
}

struct Entry {
    state: State,
    /// The first tick at or after the deadline: it fires when that tick is swept.
    tick: u64,
    /// Its place in its bucket (`tick % SLOTS`) while pending.
    pos: u32,
    waker: Option<Waker>,
}

/// One worker's deadlines (pure: the caller says what time it is).
pub(crate) struct Wheel {
    origin: Instant,
    entries: Vec<Entry>,
    free: Vec<u32>,
    buckets: Vec<Vec<u32>>,
    /// The first tick not yet swept.
    next: u64,
    pending: usize,
}

impl Wheel {
    pub(crate) fn new(origin: Instant) -> Self {
        Self {
            origin,
            entries: Vec::new(),
            free: Vec::new(),
            buckets: (0..SLOTS).map(|_| Vec::new()).collect(),
            next: 0,
            pending: 0,
        }
    }

    /// Nanoseconds from the origin to `t` (0 before it).
    fn since(&self, t: Instant) -> u64 {
        let d = t.saturating_duration_since(self.origin);
        d.as_secs()
            .saturating_mul(1_000_000_000)
            .saturating_add(u64::from(d.subsec_nanos()))
    }

    /// Ticks since the origin, rounded down (how far a sweep at `t` may go).
    fn floor(&self, t: Instant) -> u64 {
        self.since(t) / TICK_NANOS
    }

    /// The deadline `at` as the first tick at or after it.
    fn ceil(&self, at: Instant) -> u64 {
        self.since(at).div_ceil(TICK_NANOS)
    }

    /// A new deadline: its index, and the tick it fires at. One whose tick was already swept
    /// is due at once.
    pub(crate) fn insert(&mut self, at: Instant, waker: Waker) -> (u32, u64) {
        let tick = self.ceil(at);
        let state = if tick < self.next {
            State::Fired
        } else {
            State::Pending
        };
        let entry = Entry {
            state,
            tick,
            pos: 0,
            waker: Some(waker),
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.entries[i as usize] = entry;
                i
            }
            None => {
                self.entries.push(entry);
                (self.entries.len() - 1) as u32
            }
        };
        if state == State::Pending {
            let bucket = &mut self.buckets[(tick % SLOTS) as usize];
            self.entries[i as usize].pos = bucket.len() as u32;
            bucket.push(i);
            self.pending += 1;
        }
        (i, tick)
    }

    /// Whether deadline `i` has fired; if not, `waker` is the one it wakes.
    pub(crate) fn poll(&mut self, i: u32, waker: &Waker) -> bool {
        let e = &mut self.entries[i as usize];
        if e.state == State::Fired {
            return true;
        }
        match &e.waker {
            Some(w) if w.will_wake(waker) => {}
            _ => e.waker = Some(waker.clone()),
        }
        false
    }

    /// Deadline `i` is no longer wanted (fired or not).
    pub(crate) fn remove(&mut self, i: u32) {
        let e = &mut self.entries[i as usize];
        if e.state == State::Pending {
            let (tick, pos) = (e.tick, e.pos as usize);
            self.unlink(tick, pos);
        }
        let e = &mut self.entries[i as usize];
        e.state = State::Free;
        e.waker = None;
        self.free.push(i);
    }

    /// Take the entry at `pos` of `tick`'s bucket out of it (the last one takes its place).
    fn unlink(&mut self, tick: u64, pos: usize) {
        let bucket = &mut self.buckets[(tick % SLOTS) as usize];
        bucket.swap_remove(pos);
        if let Some(&moved) = bucket.get(pos) {
            self.entries[moved as usize].pos = pos as u32;
        }
        self.pending -= 1;
    }

    /// Fire every pending deadline at or before `now`'s tick: their wakers go to `woken`.
    pub(crate) fn sweep(&mut self, now: Instant, woken: &mut Vec<Waker>) {
        let last = self.floor(now);
        if last < self.next {
            return;
        }
        // Each bucket once at the most, however long since the last sweep.
        let first = self.next.max(last.saturating_sub(SLOTS - 1));
        for t in first..=last {
            let b = (t % SLOTS) as usize;
            let mut pos = 0;
            while pos < self.buckets[b].len() {
                let i = self.buckets[b][pos] as usize;
                if self.entries[i].tick <= last {
                    self.unlink(t, pos);
                    let e = &mut self.entries[i];
                    e.state = State::Fired;
                    woken.extend(e.waker.take());
                } else {
                    pos += 1;
                }
            }
        }
        self.next = last + 1;
    }

    /// The tick of the earliest pending deadline (at the latest a turn of the wheel from now,
    /// to look again then), and when it comes; None when nothing is pending.
    pub(crate) fn next_sweep(&self) -> Option<(u64, Instant)> {
        if self.pending == 0 {
            return None;
        }
        let due = (self.next..self.next + SLOTS)
            .find(|t| {
                self.buckets[(t % SLOTS) as usize]
                    .iter()
                    .any(|&i| self.entries[i as usize].tick <= *t)
            })
            .unwrap_or(self.next + SLOTS - 1);
        let since = TICK_NANOS.saturating_mul(due);
        Some((due, self.origin + Duration::from_nanos(since)))
    }
}

/// A worker's wheel, with what its ticker task needs.
struct Local {
    id: u64,
    wheel: Wheel,
    /// The ticker, while it waits (for a deadline to be pending, or for the tick it planned).
    ticker: Option<Waker>,
    /// The tick the ticker sleeps until (None: it waits for a deadline).
    planned: Option<u64>,
    /// A deadline earlier than `planned` came: the ticker plans again.
    replan: bool,
}

thread_local! {
    static LOCAL: RefCell<Option<Local>> = const { RefCell::new(None) };
}

/// Gives this worker a wheel and spawns its ticker; call inside the worker's runtime.
pub fn install() {
    static IDS: AtomicU64 = AtomicU64::new(1);
    let id = IDS.fetch_add(1, Ordering::Relaxed);
    LOCAL.with(|l| {
        *l.borrow_mut() = Some(Local {
            id,
            wheel: Wheel::new(Instant::now()),
            ticker: None,
            planned: None,
            replan: false,
        })
    });
    tokio::spawn(tick());
}

/// `f` on this thread's wheel, if it has one.
fn with_local<R>(f: impl FnOnce(&mut Local) -> R) -> Option<R> {
    LOCAL
        .try_with(|l| l.borrow_mut().as_mut().map(f))
        .ok()
        .flatten()
}

/// The worker's ticker: sleeps until the earliest pending deadline's tick (a turn of the wheel
/// at the most), fires what is due, and plans again; waits while nothing is pending.
async fn tick() {
    let sleep = tokio::time::sleep(TICK);
    tokio::pin!(sleep);
    let mut woken = Vec::new();
    loop {
        let at = poll_fn(|cx| {
            with_local(|l| {
                l.replan = false;
                match l.wheel.next_sweep() {
                    Some((tick, at)) => {
                        l.planned = Some(tick);
                        Poll::Ready(at)
                    }
                    None => {
                        l.planned = None;
                        l.ticker = Some(cx.waker().clone());
                        Poll::Pending
                    }
                }
            })
            // The wheel went with its thread: nothing to tick.
            .unwrap_or(Poll::Pending)
        })
        .await;
        sleep.as_mut().reset(tokio::time::Instant::from_std(at));
        poll_fn(|cx| {
            if sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready(());
            }
            with_local(|l| {
                if l.replan {
                    Poll::Ready(())
                } else {
                    l.ticker = Some(cx.waker().clone());
                    Poll::Pending
                }
            })
            .unwrap_or(Poll::Pending)
        })
        .await;
        with_local(|l| l.wheel.sweep(Instant::now(), &mut woken));
        for w in woken.drain(..) {
            w.wake();
        }
    }
}

/// A deadline: ready once `at` has passed.
pub struct Deadline {
    at: Instant,
    state: Waiting,
}

enum Waiting {
    /// Not polled yet.
    New,
    /// An entry of worker `wheel`'s wheel.
    Wheel {
        wheel: u64,
        index: u32,
    },
    /// Off a worker: a tokio timer.
    Tokio(Pin<Box<tokio::time::Sleep>>),
    Done,
}

impl Deadline {
    pub fn at(at: Instant) -> Self {
        Self {
            at,
            state: Waiting::New,
        }
    }
}

impl Future for Deadline {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                Waiting::New => {
                    let at = this.at;
                    let entered = with_local(|l| {
                        let (index, tick) = l.wheel.insert(at, cx.waker().clone());
                        // Earlier than the tick the ticker sleeps until (or it waits for a
                        // first deadline): it plans again.
                        if l.planned.is_none_or(|p| tick < p) {
                            l.replan = true;
                            if let Some(t) = l.ticker.take() {
                                t.wake();
                            }
                        }
                        (l.id, index)
                    });
                    this.state = match entered {
                        Some((wheel, index)) => Waiting::Wheel { wheel, index },
                        None => Waiting::Tokio(Box::pin(tokio::time::sleep_until(
                            tokio::time::Instant::from_std(at),
                        ))),
                    };
                }
                Waiting::Wheel { wheel, index } => {
                    let (wheel, index) = (*wheel, *index);
                    let fired =
                        with_local(|l| (l.id == wheel).then(|| l.wheel.poll(index, cx.waker())))
                            .flatten();
                    return match fired {
                        Some(false) => Poll::Pending,
                        Some(true) => {
                            this.release();
                            this.state = Waiting::Done;
                            Poll::Ready(())
                        }
                        // Polled off its worker (never expected): it waits where it is now.
                        None => {
                            this.release();
                            continue;
                        }
                    };
                }
                Waiting::Tokio(sleep) => {
                    std::task::ready!(sleep.as_mut().poll(cx));
                    this.state = Waiting::Done;
                    return Poll::Ready(());
                }
                Waiting::Done => return Poll::Ready(()),
            }
        }
    }
}

impl Deadline {
    /// The wheel's entry goes (it is this worker's, as every future of a worker stays on it);
    /// the next poll starts over.
    fn release(&mut self) {
        if let Waiting::Wheel { wheel, index } = self.state {
            with_local(|l| {
                if l.id == wheel {
                    l.wheel.remove(index);
                }
            });
            self.state = Waiting::New;
        }
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        self.release();
    }
}

/// The deadline passed before the future finished.
#[derive(Debug)]
pub struct Elapsed;

pin_project_lite::pin_project! {
    /// `inner`, unless its deadline passes first (see [`timeout_at`]).
    pub struct Timeout<F> {
        #[pin]
        inner: F,
        deadline: Deadline,
    }
}

/// `f`, unless `at` passes first.
pub fn timeout_at<F: Future>(at: Instant, f: F) -> Timeout<F> {
    Timeout {
        inner: f,
        deadline: Deadline::at(at),
    }
}

impl<F: Future> Future for Timeout<F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(v) = this.inner.poll(cx) {
            return Poll::Ready(Ok(v));
        }
        Pin::new(this.deadline).poll(cx).map(|()| Err(Elapsed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::task::Wake;

    struct Count(std::sync::atomic::AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn waker() -> Waker {
        Waker::from(Arc::new(Count(Default::default())))
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_deadline_fires_on_the_first_sweep_at_or_after_it_and_never_before() {
        let o = Instant::now();
        // (deadline, sweep times, the sweep that fires it)
        let cases: &[(u64, &[u64], Option<usize>)] = &[
            (25, &[10, 20, 29, 30], Some(3)),
            (30, &[29, 30], Some(1)),
            (0, &[0], Some(0)),
            (5, &[4, 9, 10], Some(2)),
            (3_000, &[2_990, 2_999], None),
            (3_000, &[100, 2_560, 3_000], Some(2)),
            (10_000, &[12_000], Some(0)),
        ];
        for (i, (at, sweeps, fires)) in cases.iter().enumerate() {
            let mut w = Wheel::new(o);
            let k = w.insert(o + ms(*at), waker()).0;
            let mut fired_at = None;
            for (j, s) in sweeps.iter().enumerate() {
                let mut woken = Vec::new();
                w.sweep(o + ms(*s), &mut woken);
                if !woken.is_empty() && fired_at.is_none() {
                    fired_at = Some(j);
                    assert!(*s >= *at, "case {i}: fired at {s} ms, before {at}");
                }
            }
            assert_eq!(fired_at, *fires, "case {i}");
            assert_eq!(w.poll(k, &waker()), fires.is_some(), "case {i}");
        }
    }

    #[test]
    fn a_removed_deadline_never_fires_and_its_slot_is_reused() {
        let o = Instant::now();
        let mut w = Wheel::new(o);
        let a = w.insert(o + ms(50), waker()).0;
        let b = w.insert(o + ms(50), waker()).0;
        let c = w.insert(o + ms(50), waker()).0;
        w.remove(a);
        let mut woken = Vec::new();
        w.sweep(o + ms(60), &mut woken);
        assert_eq!(woken.len(), 2);
        assert!(w.poll(b, &waker()) && w.poll(c, &waker()));
        w.remove(b);
        w.remove(c);
        assert!(w.next_sweep().is_none());
        let d = w.insert(o + ms(100), waker()).0;
        assert!(d == b || d == c, "a freed slot is used again");
        // A deadline already swept past is due at once.
        let e = w.insert(o + ms(10), waker()).0;
        assert!(w.poll(e, &waker()));
    }

    #[test]
    fn the_next_sweep_is_the_earliest_pending_tick_or_a_turn_on() {
        let o = Instant::now();
        let mut w = Wheel::new(o);
        let far = w.insert(o + Duration::from_secs(30), waker()).0;
        // Nothing due within a turn: look again a turn on.
        assert_eq!(w.next_sweep().map(|n| n.0), Some(SLOTS - 1));
        let near = w.insert(o + ms(95), waker()).0;
        assert_eq!(w.next_sweep(), Some((10, o + ms(100))));
        w.remove(near);
        assert_eq!(w.next_sweep().map(|n| n.0), Some(SLOTS - 1));
        let mut woken = Vec::new();
        w.sweep(o + Duration::from_secs(29), &mut woken);
        assert!(woken.is_empty());
        assert_eq!(w.next_sweep().map(|n| n.0), Some(3_000));
        w.sweep(o + Duration::from_secs(30), &mut woken);
        assert_eq!(woken.len(), 1);
        assert!(w.poll(far, &waker()) && w.next_sweep().is_none());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64),
        Remove(usize),
        Sweep(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u64..6_000).prop_map(Op::Insert),
            2 => (0usize..64).prop_map(Op::Remove),
            2 => (0u64..400).prop_map(Op::Sweep),
        ]
    }

    proptest! {
        /// Against a model that keeps every deadline in a map: after any sequence of inserts
        /// (relative to the current time), removals and sweeps, the wheel fires exactly the
        /// deadlines the model says are due, each once, none early.
        #[test]
        fn the_wheel_fires_what_a_plain_map_says_is_due(ops in proptest::collection::vec(op(), 1..200)) {
            let o = Instant::now();
            let mut w = Wheel::new(o);
            let mut now = 0u64;
            // key -> (deadline in ms, fired)
            let mut model: BTreeMap<u32, (u64, bool)> = BTreeMap::new();
            let mut swept_to = 0u64;
            for op in ops {
                match op {
                    Op::Insert(d) => {
                        let at = now + d;
                        let k = w.insert(o + ms(at), waker()).0;
                        prop_assert!(!model.contains_key(&k));
                        // Due at once when its tick was swept already.
                        let due_now = at.div_ceil(10) < swept_to;
                        model.insert(k, (at, due_now));
                        prop_assert_eq!(w.poll(k, &waker()), due_now);
                    }
                    Op::Remove(n) => {
                        if let Some(&k) = model.keys().nth(n % model.len().max(1)) {
                            w.remove(k);
                            model.remove(&k);
                        }
                    }
                    Op::Sweep(step) => {
                        now += step;
                        let mut woken = Vec::new();
                        w.sweep(o + ms(now), &mut woken);
                        swept_to = now / 10 + 1;
                        let mut fired = 0;
                        for (k, (at, done)) in model.iter_mut() {
                            let due = at.div_ceil(10) < swept_to;
                            if due && !*done {
                                fired += 1;
                                *done = true;
                                prop_assert!(*at <= now, "fired early");
                            }
                            prop_assert_eq!(w.poll(*k, &waker()), due);
                        }
                        prop_assert_eq!(woken.len(), fired);
                    }
                }
                // The ticker plans for the earliest pending deadline, or a turn on.
                let earliest = model.values().filter(|(_, f)| !f).map(|(at, _)| at.div_ceil(10)).min();
                match (w.next_sweep(), earliest) {
                    (None, None) => {}
                    (Some((t, _)), Some(e)) => prop_assert_eq!(t, e.min(swept_to + SLOTS - 1)),
                    (planned, earliest) => prop_assert!(false, "planned {:?}, earliest {:?}", planned, earliest),
                }
            }
        }
    }

    #[test]
    fn timeout_at_ends_a_future_on_a_worker_wheel_and_off_one() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            // Off a worker first: a tokio timer.
            let t0 = Instant::now();
            let r = timeout_at(t0 + ms(50), std::future::pending::<()>()).await;
            assert!(r.is_err() && t0.elapsed() >= ms(50));
            install();
            let t0 = Instant::now();
            // Bounded by a tokio timer: a wheel that never fires fails here instead of hanging.
            let r = tokio::time::timeout(
                Duration::from_secs(5),
                timeout_at(t0 + ms(50), std::future::pending::<()>()),
            )
            .await
            .expect("the wheel's deadline never fired");
            assert!(r.is_err() && t0.elapsed() >= ms(50));
            let r = timeout_at(Instant::now() + ms(200), async { 7 }).await;
            assert_eq!(r.unwrap(), 7);
            // Finished first: its entry is gone, and the wheel has nothing pending.
            let r = timeout_at(
                Instant::now() + Duration::from_secs(30),
                tokio::time::sleep(ms(20)),
            )
            .await;
            assert!(r.is_ok());
            assert_eq!(with_local(|l| l.wheel.pending), Some(0));
        });
    }
}
