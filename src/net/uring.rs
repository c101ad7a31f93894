//! Plain-TCP client and backend sockets driven through io_uring (`proxy.io_uring`), one ring
//! per data-plane worker.
//!
//! Streams queue their receives and sends on their worker's ring; one driver task per worker
//! submits everything queued since its last turn in one `io_uring_enter`, reaps the completions
//! and wakes the streams they belong to, then lets those run before its next turn. A worker with
//! many busy connections thus enters the kernel about once per round instead of once per read
//! and once per write (under `h2load -c64`: 0.11 system calls per proxied request instead of 4).
//!
//! Receives take their buffer from the worker's provided-buffer group only when data arrives,
//! so a connection waiting for its next request holds none; a write over 4 KiB goes to the
//! socket at once, and what the socket does not take, or a smaller write, is copied into the
//! stream's own buffer for the ring's send (the kernel reads it after `poll_write` returns); a
//! flush waits for no send in flight, as a socket's waits for no segment. The ring is set up
//! with cooperative task running: completions are not pushed at a running worker by an
//! interrupt, they are collected at its next enter. Where the kernel refuses a ring (a seccomp
//! profile, `kernel.io_uring_disabled`), the worker keeps epoll.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::sync::MutexExt;

/// Completions nobody waits for: cancellations and buffers given back.
const UNWATCHED: u64 = u64::MAX;
/// Receives take a buffer from the worker's buffer ring as data arrives: `BUFS` of `BUF` bytes.
/// When all are in use, a receive has a buffer of its own, let go of once read.
const BUF: usize = 8 * 1024;
const BUFS: u16 = 256;
const GROUP: u16 = 0;
/// Submission queue entries (the completion queue has twice as many).
const ENTRIES: u32 = 1024;
/// `IORING_RECVSEND_POLL_FIRST` (Linux 5.19; older kernels ignore it): a receive waits for the
/// socket to be readable before it tries, instead of trying, finding nothing, and waiting.
const POLL_FIRST: u16 = 1;
/// A write larger than this goes to the socket at once (see `send_now`); a smaller one is
/// copied for the ring's send.
const DIRECT_SEND: usize = 4096;

#[derive(Default)]
struct Slot {
    /// Bumped each time the slot is freed: a completion or a cancel that names an earlier use
    /// (`user_data` carries the generation beside the slot's number) never touches a later one.
    generation: u32,
    waker: Option<Waker>,
    /// The completion's result and flags, until its stream takes them.
    result: Option<(i32, u32)>,
    /// The stream went away with this operation in flight: what the kernel may still use
    /// waits here for the completion, and the slot is freed then.
    orphan: Option<Orphan>,
}

/// What an operation whose stream went away keeps alive until its completion: the bytes the
/// kernel may read (a send) or write (a receive into the stream's own buffer), and the socket,
/// so that its number cannot be given to another connection while the operation names it.
struct Orphan {
    _buf: Vec<u8>,
    _fd: Option<Arc<OwnedFd>>,
}

/// Generations count in 31 bits: a `user_data` never has its top bit set, so never equals
/// `UNWATCHED`.
const GENERATIONS: u32 = 0x7fff_ffff;

/// A slot's number and generation, as one operation's `user_data`.
fn user_data(slot: usize, generation: u32) -> u64 {
    (u64::from(generation & GENERATIONS) << 32) | (slot as u64 & u64::from(u32::MAX))
}

struct Driver {
    /// Tells this worker's ring from the others': a stream is only ever used on its own.
    id: u64,
    ring: IoUring,
    slots: Vec<Slot>,
    free: Vec<usize>,
    /// Entries pushed since the last enter.
    queued: usize,
    /// The driver task, when it waits for work.
    waker: Option<Waker>,
    /// The ring's buffers, `BUFS` of `BUF` bytes. A raw pointer, never a reference: the kernel
    /// writes into buffers it picked while others are read here.
    pool: *mut u8,
    /// The buffer ring shared with the kernel (page-aligned), and its tail as last published.
    bufs: *mut types::BufRingEntry,
    tail: u16,
    /// Streams of this ring dropped elsewhere.
    mailbox: Arc<Mailbox>,
}

thread_local! {
    static DRIVER: RefCell<Option<Driver>> = const { RefCell::new(None) };
}

/// A stream that went away, with what the kernel may still use.
struct Gone {
    fd: OwnedFd,
    /// A ring buffer the stream held (received bytes not yet read).
    held: Option<u16>,
    /// Operations the stream had in flight, each with the bytes the kernel may use.
    ops: [(Option<usize>, Vec<u8>); 2],
}

/// Where a stream dropped on another thread than its ring's (an idle backend connection whose
/// pool went with a pool change on the control thread, say) is handed back to its driver.
struct Mailbox {
    ring: u64,
    gone: Mutex<Vec<Gone>>,
    /// The driver task, when it waits.
    waker: Mutex<Option<Waker>>,
}

/// Every live driver's mailbox.
static MAILBOXES: Mutex<Vec<Arc<Mailbox>>> = Mutex::new(Vec::new());

/// This thread's ring, if it has one (a worker of a peer with `proxy.io_uring` on).
fn ring_id() -> Option<u64> {
    DRIVER.with(|d| d.borrow().as_ref().map(|d| d.id))
}

/// Whether this thread's sockets go through a ring.
pub fn enabled() -> bool {
    ring_id().is_some()
}

/// Sets up this worker's ring and spawns its driver; call inside the worker's runtime.
pub fn install() -> io::Result<()> {
    static IDS: AtomicU64 = AtomicU64::new(1);
    let ring = IoUring::builder()
        .setup_coop_taskrun()
        .setup_taskrun_flag()
        .setup_single_issuer()
        .build(ENTRIES)?;
    let fd = ring.as_raw_fd();
    let layout = std::alloc::Layout::from_size_align(
        BUFS as usize * std::mem::size_of::<types::BufRingEntry>(),
        4096,
    )
    .map_err(io::Error::other)?;
    // SAFETY: a non-zero size; the memory is leaked with the ring (see Drop for Driver).
    let bufs = unsafe { std::alloc::alloc_zeroed(layout) } as *mut types::BufRingEntry;
    if bufs.is_null() {
        return Err(io::Error::other("io_uring: no memory for the buffer ring"));
    }
    let id = IDS.fetch_add(1, Ordering::Relaxed);
    let mailbox = Arc::new(Mailbox {
        ring: id,
        gone: Mutex::new(Vec::new()),
        waker: Mutex::new(None),
    });
    let mut driver = Driver {
        id,
        mailbox: mailbox.clone(),
        ring,
        slots: Vec::new(),
        free: Vec::new(),
        queued: 0,
        waker: None,
        // Zeroed by the allocator (fresh pages): untouched until a receive fills them. Leaked
        // with the ring (see Drop for Driver).
        pool: Box::into_raw(vec![0u8; BUF * BUFS as usize].into_boxed_slice()).cast::<u8>(),
        bufs,
        tail: 0,
    };
    // SAFETY: `bufs` holds BUFS entries, page-aligned, and lives as long as the ring.
    unsafe {
        driver
            .ring
            .submitter()
            .register_buf_ring_with_flags(bufs as u64, BUFS, GROUP, 0)?;
    }
    for b in 0..BUFS {
        driver.give_back(b)?;
    }
    DRIVER.with(|d| *d.borrow_mut() = Some(driver));
    MAILBOXES.locked().push(mailbox);
    tokio::spawn(async move {
        drive(fd).await;
        uninstall(id);
    });
    Ok(())
}

/// The driver ended (its ring could not be watched): this worker's new sockets use epoll. The
/// ring is leaked, not closed, since the kernel may still use what its operations name.
fn uninstall(id: u64) {
    tracing::error!("io_uring: the driver stopped; this worker's new connections use epoll");
    MAILBOXES.locked().retain(|m| m.ring != id);
    DRIVER.with(|d| {
        let mut d = d.borrow_mut();
        if d.as_ref().is_some_and(|d| d.id == id) {
            std::mem::forget(d.take());
        }
    });
}

/// The kernel's `struct io_uring_buf`: one entry of a provided-buffer ring.
#[repr(C)]
struct RingBuf {
    addr: u64,
    len: u32,
    bid: u16,
    /// The ring's tail, in the first entry.
    _resv: u16,
}

const _: () = assert!(std::mem::size_of::<RingBuf>() == std::mem::size_of::<types::BufRingEntry>());

struct RingFd(RawFd);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// The worker's driver: enter (when anything is queued or waiting), reap, wake; then come back
/// after the woken tasks ran, or wait for the ring to be readable (completions posted while the
/// worker slept) or for a stream to queue something.
async fn drive(fd: RawFd) {
    // SAFETY: the ring (in this thread's DRIVER) outlives this task, which the worker's
    // runtime drops before the thread's locals go.
    let afd = unsafe { AsyncFd::register_with_interest(RingFd(fd), tokio::io::Interest::READABLE) };
    let Ok(afd) = afd else {
        tracing::error!("io_uring: cannot watch the ring");
        return;
    };
    let mut woken: Vec<Waker> = Vec::new();
    poll_fn(|cx| loop {
        let progressed = DRIVER.with(|d| {
            let mut d = d.borrow_mut();
            let Some(d) = d.as_mut() else { return false };
            d.adopt();
            let queued = d.queued;
            // Completions waiting on this thread's task work, or held back by a full
            // completion queue, need an enter too.
            let waiting = {
                let sq = d.ring.submission();
                sq.taskrun() || sq.cq_overflow()
            };
            if queued > 0 || waiting {
                match d.ring.submit() {
                    Ok(_) => {}
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::EBUSY | libc::EAGAIN | libc::EINTR)
                        ) => {}
                    Err(e) => tracing::error!(error = %e, "io_uring_enter"),
                }
                // What the kernel did not take yet goes with the next turn.
                d.queued = d.ring.submission().len();
            }
            d.reap(&mut woken);
            // Buffers given back while reaping are queued: they go on the next turn.
            let progressed = queued > 0 || !woken.is_empty() || d.queued > 0;
            if !progressed {
                d.waker = Some(cx.waker().clone());
                *d.mailbox.waker.locked() = Some(cx.waker().clone());
                // A stream handed back meanwhile must not wait for the next wake-up.
                if !d.mailbox.gone.locked().is_empty() {
                    return true;
                }
            }
            progressed
        });
        for w in woken.drain(..) {
            w.wake();
        }
        if progressed {
            // Come back after the tasks just woken have run: what they queue goes in one batch.
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        match afd.poll_read_ready(cx) {
            Poll::Ready(Ok(mut g)) => g.clear_ready(),
            Poll::Ready(Err(e)) => {
                tracing::error!(error = %e, "io_uring: the ring cannot be watched");
                return Poll::Ready(());
            }
            Poll::Pending => return Poll::Pending,
        }
    })
    .await
}

impl Driver {
    fn reap(&mut self, woken: &mut Vec<Waker>) {
        let mut back: Vec<u16> = Vec::new();
        let Driver {
            ring, slots, free, ..
        } = self;
        for cqe in ring.completion() {
            let ud = cqe.user_data();
            if ud == UNWATCHED {
                let r = cqe.result();
                if r < 0 && r != -libc::ENOENT && r != -libc::EALREADY {
                    tracing::debug!(error = %io::Error::from_raw_os_error(-r), "io_uring");
                }
                continue;
            }
            let (i, generation) = ((ud & u64::from(u32::MAX)) as usize, (ud >> 32) as u32);
            let Some(s) = slots.get_mut(i).filter(|s| s.generation == generation) else {
                // Not this slot's current operation (never expected: each use completes once).
                back.extend(cqueue::buffer_select(cqe.flags()));
                continue;
            };
            if s.orphan.take().is_some() {
                // Its stream is gone; a buffer the receive took goes back to the group, and
                // the socket closes once no operation names it.
                back.extend(cqueue::buffer_select(cqe.flags()));
                s.waker = None;
                s.generation = s.generation.wrapping_add(1) & GENERATIONS;
                free.push(i);
                continue;
            }
            s.result = Some((cqe.result(), cqe.flags()));
            if let Some(w) = s.waker.take() {
                woken.push(w);
            }
        }
        for b in back {
            let _ = self.give_back(b);
        }
    }

    fn buffer(&self, b: u16) -> *mut u8 {
        // SAFETY: in bounds: b % BUFS < BUFS, and the pool holds BUFS buffers of BUF bytes.
        unsafe { self.pool.add((b % BUFS) as usize * BUF) }
    }

    /// Buffer `b` is read: back on the ring for the kernel to hand out again (no system call).
    fn give_back(&mut self, b: u16) -> io::Result<()> {
        let addr = self.buffer(b) as u64;
        let i = (self.tail & (BUFS - 1)) as usize;
        // SAFETY: `bufs` holds BUFS entries of the kernel's `io_uring_buf` layout; the kernel
        // reads entries only up to the tail published below, and this one is past it. Written
        // through raw pointers field by field (no reference to memory the kernel shares): the
        // tail is the first entry's last field, which is not written here; the release store
        // publishes the entry with it.
        unsafe {
            let e = self.bufs.add(i).cast::<RingBuf>();
            std::ptr::addr_of_mut!((*e).addr).write(addr);
            std::ptr::addr_of_mut!((*e).len).write(BUF as u32);
            std::ptr::addr_of_mut!((*e).bid).write(b);
            self.tail = self.tail.wrapping_add(1);
            let tail = types::BufRingEntry::tail(self.bufs) as *const std::sync::atomic::AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
        Ok(())
    }

    fn push(&mut self, entry: squeue::Entry) -> io::Result<()> {
        // SAFETY: what an entry points at lives until its completion is reaped: a send's bytes
        // in its stream (or, once the stream is gone, in its slot), the group's buffers in
        // `pool`, which is never freed while the ring lives.
        unsafe {
            if self.ring.submission().push(&entry).is_err() {
                self.ring.submit()?;
                self.queued = self.ring.submission().len();
                self.ring
                    .submission()
                    .push(&entry)
                    .map_err(|_| io::Error::other("io_uring submission queue full"))?;
            }
        }
        self.queued += 1;
        if let Some(w) = self.waker.take() {
            w.wake();
        }
        Ok(())
    }

    /// Queues `entry` under a new slot: its number.
    fn start(&mut self, entry: squeue::Entry) -> io::Result<usize> {
        let i = self.free.pop().unwrap_or_else(|| {
            self.slots.push(Slot::default());
            self.slots.len() - 1
        });
        let ud = user_data(i, self.slots[i].generation);
        match self.push(entry.user_data(ud)) {
            Ok(()) => Ok(i),
            Err(e) => {
                self.release(i);
                Err(e)
            }
        }
    }

    /// Slot `i` is free again (its operation's completion was taken).
    fn release(&mut self, i: usize) {
        let s = &mut self.slots[i];
        s.waker = None;
        s.result = None;
        s.generation = s.generation.wrapping_add(1) & GENERATIONS;
        self.free.push(i);
    }

    /// A stream went away: its held buffer goes back, operations still in flight keep what the
    /// kernel may use (and the socket) until they complete, and are cancelled; the socket closes
    /// at once if nothing names it. Never returns early: every operation is seen to.
    fn abandon(&mut self, gone: Gone) {
        let Gone { fd, held, ops } = gone;
        if let Some(b) = held {
            let _ = self.give_back(b);
        }
        let mut fd = Some(fd);
        let mut shared: Option<Arc<OwnedFd>> = None;
        for (op, buf) in ops {
            let Some(op) = op else { continue };
            let s = &mut self.slots[op];
            if let Some((_, flags)) = s.result.take() {
                // Completed, not yet taken: nothing of it is in flight.
                self.release(op);
                if let Some(b) = cqueue::buffer_select(flags) {
                    let _ = self.give_back(b);
                }
                continue;
            }
            let keep = match (&shared, fd.take()) {
                (Some(a), _) => a.clone(),
                (None, Some(f)) => shared.insert(Arc::new(f)).clone(),
                (None, None) => continue,
            };
            let raw = keep.as_raw_fd();
            let s = &mut self.slots[op];
            s.waker = None;
            s.orphan = Some(Orphan {
                _buf: buf,
                _fd: Some(keep),
            });
            let target = user_data(op, s.generation);
            let cancel = opcode::AsyncCancel::new(target)
                .build()
                .user_data(UNWATCHED);
            if self.push(cancel).is_err() {
                // No room to cancel: shutting the socket down ends its operations as surely.
                // SAFETY: shutdown(2) on a descriptor the orphan keeps open.
                unsafe { libc::shutdown(raw, libc::SHUT_RDWR) };
            }
        }
        // Nothing in flight named the socket: it closes here.
        drop(fd);
    }

    /// Streams of this ring dropped on other threads, handed back through the mailbox.
    fn adopt(&mut self) {
        let gone = std::mem::take(&mut *self.mailbox.gone.locked());
        for g in gone {
            self.abandon(g);
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // Buffers the kernel may still write into or read from must outlive the ring's
        // teardown, which finishes after close(2) returns: the thread is ending anyway.
        for s in self.slots.drain(..) {
            if let Some(o) = s.orphan {
                std::mem::forget(o);
            }
        }
        // `pool` (a raw pointer) is never freed.
    }
}

/// `f` on this thread's driver, which must be ring `ring`.
fn with<R>(ring: u64, f: impl FnOnce(&mut Driver) -> io::Result<R>) -> io::Result<R> {
    DRIVER.with(|d| match d.borrow_mut().as_mut() {
        Some(d) if d.id == ring => f(d),
        _ => Err(io::Error::other("io_uring stream used off its worker")),
    })
}

/// Operation `op`'s result and flags if it completed (its slot freed); else its waker is set.
fn take(ring: u64, op: usize, cx: &mut Context<'_>) -> io::Result<Option<(i32, u32)>> {
    take_or_watch(ring, op, Some(cx.waker()))
}

/// `take`, with `waker` (if any) woken at the completion when it has not come yet.
fn take_or_watch(ring: u64, op: usize, waker: Option<&Waker>) -> io::Result<Option<(i32, u32)>> {
    with(ring, |d| {
        let s = &mut d.slots[op];
        match s.result.take() {
            Some(r) => {
                d.release(op);
                Ok(Some(r))
            }
            None => {
                if let Some(waker) = waker {
                    match &s.waker {
                        Some(w) if w.will_wake(waker) => {}
                        _ => s.waker = Some(waker.clone()),
                    }
                }
                Ok(None)
            }
        }
    })
}

/// The read side of a [`UringStream`].
enum Rx {
    /// Nothing received is waiting and no receive is in flight.
    Idle,
    /// A receive in flight that takes a buffer of the ring's group when data arrives.
    Ring(usize),
    /// A receive in flight into a buffer of the stream's own (the ring had none left).
    Own(usize, Vec<u8>),
    /// Received bytes in the ring's buffer `buf`, read up to `pos` of `end`.
    Held { buf: u16, pos: usize, end: usize },
    /// Received bytes in the stream's own buffer, read up to `pos` of `end`.
    OwnHeld {
        bytes: Vec<u8>,
        pos: usize,
        end: usize,
    },
    /// The peer closed its side.
    Eof,
}

/// A TCP connection whose reads and writes go through its worker's ring.
pub struct UringStream {
    /// Closed by Drop, or later, by the last operation that names it (see `Driver::abandon`).
    fd: std::mem::ManuallyDrop<OwnedFd>,
    ring: u64,
    /// What the read side is doing.
    rx: Rx,
    /// The last receive filled its buffer: more is likely waiting, so the next read asks the
    /// socket at once (a bulk transfer reads as over epoll, in big reads, not a ring turn each).
    streaming: bool,
    /// Bytes being sent, from `wpos` on; the send in flight.
    wbuf: Vec<u8>,
    wpos: usize,
    wop: Option<usize>,
    /// The connection closes after what is written now (`hold_for_close`): sends carry
    /// MSG_MORE, so the last bytes wait in the socket for the shutdown's FIN.
    hold: bool,
}

impl UringStream {
    /// Moves a connected socket of this worker onto its ring.
    pub fn from_tokio(s: tokio::net::TcpStream) -> io::Result<Self> {
        let s = s.into_std()?;
        // The ring waits for the socket itself; blocking mode keeps the kernel from answering
        // a receive with EAGAIN.
        s.set_nonblocking(false)?;
        Self::from_std(s)
    }

    /// A connected blocking socket of this worker, onto its ring.
    pub fn from_std(s: std::net::TcpStream) -> io::Result<Self> {
        let ring = ring_id().ok_or_else(|| io::Error::other("no io_uring on this thread"))?;
        // SAFETY: the descriptor is owned by `s`, handed over here.
        let fd = unsafe { OwnedFd::from_raw_fd(s.into_raw_fd()) };
        Ok(Self {
            fd: std::mem::ManuallyDrop::new(fd),
            ring,
            rx: Rx::Idle,
            streaming: false,
            wbuf: Vec::new(),
            wpos: 0,
            wop: None,
            hold: false,
        })
    }

    fn start_send(&mut self) -> io::Result<()> {
        let fd = self.fd.as_raw_fd();
        let rest = &self.wbuf[self.wpos..];
        let (ptr, len) = (rest.as_ptr(), rest.len() as u32);
        let more = self.more();
        self.wop = Some(with(self.ring, |d| {
            d.start(
                opcode::Send::new(types::Fd(fd), ptr, len)
                    .flags(libc::MSG_NOSIGNAL | more)
                    .build(),
            )
        })?);
        Ok(())
    }

    /// A big write goes to the socket at once, from the caller's bytes (as over epoll: its
    /// system call is paid for by its size, and there is no copy): how much the socket took,
    /// or None if it had no room (the ring's send then waits for it).
    fn send_now(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<Option<usize>> {
        // SAFETY: a zeroed msghdr is valid; it points at the caller's slices (IoSlice is
        // ABI-compatible with iovec) for the duration of the call.
        let n = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
            msg.msg_iovlen = bufs.len().min(libc::UIO_MAXIOV as usize) as _;
            libc::sendmsg(
                self.fd.as_raw_fd(),
                &msg,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL | self.more(),
            )
        };
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock {
            Ok(None)
        } else {
            Err(e)
        }
    }

    /// MSG_MORE once the connection is to close after what is being written.
    fn more(&self) -> libc::c_int {
        if self.hold {
            libc::MSG_MORE
        } else {
            0
        }
    }

    /// Waits for the send in flight (and the rest of it, if the kernel took part) to finish.
    fn poll_sent(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.settle(Some(cx.waker()))
    }

    /// What the send in flight came to, if it completed (the rest of it sent again when the
    /// kernel took part): Pending while one is in flight, `waker` then woken at its end.
    fn settle(&mut self, waker: Option<&Waker>) -> Poll<io::Result<()>> {
        while let Some(op) = self.wop {
            let Some((r, _)) = take_or_watch(self.ring, op, waker)? else {
                return Poll::Pending;
            };
            self.wop = None;
            if r == -libc::EINTR {
                // Interrupted before any byte went: send the rest again.
                self.start_send()?;
                continue;
            }
            if r < 0 {
                self.wbuf.clear();
                self.wpos = 0;
                return Poll::Ready(Err(io::Error::from_raw_os_error(-r)));
            }
            self.wpos += r as usize;
            if self.wpos < self.wbuf.len() {
                self.start_send()?;
            } else {
                // Sent: an idle connection keeps no send buffer (the next write takes one of
                // the allocator's free ones, sized for it).
                self.wpos = 0;
                self.wbuf = Vec::new();
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl crate::net::Transport for UringStream {
    fn hold_for_close(&mut self) {
        // The shutdown's FIN then pushes the held bytes (tcp_send_fin), in one segment with them.
        self.hold = true;
    }

    fn let_go(&mut self) -> io::Result<()> {
        match self.settle(None) {
            Poll::Ready(r) => r,
            // Still in flight (rare: the peer reads slowly): its completion frees it later.
            Poll::Pending => Ok(()),
        }
    }
}

impl AsyncRead for UringStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let step = match std::mem::replace(&mut this.rx, Rx::Idle) {
                Rx::Held { buf: b, pos, end } => this.copy_held(b, pos, end, buf),
                Rx::OwnHeld { bytes, pos, end } => {
                    let n = (end - pos).min(buf.remaining());
                    buf.put_slice(&bytes[pos..pos + n]);
                    if pos + n < end {
                        this.rx = Rx::OwnHeld {
                            bytes,
                            pos: pos + n,
                            end,
                        };
                    }
                    return Poll::Ready(Ok(()));
                }
                Rx::Eof => {
                    this.rx = Rx::Eof;
                    return Poll::Ready(Ok(()));
                }
                Rx::Own(op, bytes) => this.own_received(op, bytes, cx),
                Rx::Ring(op) => this.ring_received(op, cx),
                Rx::Idle => return this.receive(cx, buf),
            };
            match step {
                Err(e) => return Poll::Ready(Err(e)),
                Ok(Some(poll)) => return poll,
                // The state moved on: look again.
                Ok(None) => {}
            }
        }
    }
}

/// What one step of `poll_read` came to: an answer for the caller (`Some`), or a new state to
/// look at (`None`).
type ReadStep = io::Result<Option<Poll<io::Result<()>>>>;

impl UringStream {
    /// Copy from ring buffer `b` (bytes `pos..end` left), giving it back once emptied.
    fn copy_held(&mut self, b: u16, pos: usize, end: usize, buf: &mut ReadBuf<'_>) -> ReadStep {
        let n = (end - pos).min(buf.remaining());
        let done = pos + n == end;
        if !done {
            self.rx = Rx::Held {
                buf: b,
                pos: pos + n,
                end,
            };
        }
        with(self.ring, |d| {
            let p = d.buffer(b);
            // SAFETY: the kernel wrote `end` bytes into buffer `b`, which is this stream's
            // until given back.
            buf.put_slice(unsafe { std::slice::from_raw_parts(p.add(pos), n) });
            if done {
                d.give_back(b)?;
            }
            Ok(())
        })?;
        Ok(Some(Poll::Ready(Ok(()))))
    }

    /// A receive into this stream's own buffer (the ring had none left): its completion.
    fn own_received(&mut self, op: usize, bytes: Vec<u8>, cx: &mut Context<'_>) -> ReadStep {
        // Until its completion is taken, the kernel may write into `bytes`.
        let got = take(self.ring, op, cx);
        let Ok(Some((r, _))) = got else {
            self.rx = Rx::Own(op, bytes);
            return Ok(Some(waiting(got)));
        };
        if r == -libc::EINTR {
            // Interrupted before any byte: receive again (rx is Idle).
            return Ok(None);
        }
        if r < 0 {
            return Err(io::Error::from_raw_os_error(-r));
        }
        self.rx = match r {
            0 => Rx::Eof,
            r => Rx::OwnHeld {
                bytes,
                pos: 0,
                end: r as usize,
            },
        };
        Ok(None)
    }

    /// A receive into a buffer of the ring: its completion.
    fn ring_received(&mut self, op: usize, cx: &mut Context<'_>) -> ReadStep {
        let ring = self.ring;
        let got = take(ring, op, cx);
        let Ok(Some((r, flags))) = got else {
            self.rx = Rx::Ring(op);
            return Ok(Some(waiting(got)));
        };
        let b = cqueue::buffer_select(flags);
        if r == -libc::EINTR {
            if let Some(b) = b {
                with(ring, |d| d.give_back(b))?;
            }
            return Ok(None);
        }
        if r == -libc::ENOBUFS {
            // Every buffer of the ring is in use: this receive gets its own.
            tracing::debug!("io_uring: no ring buffer left; a receive gets its own");
            let mut own = vec![0; BUF];
            let (fd, ptr) = (self.fd.as_raw_fd(), own.as_mut_ptr());
            let op = with(ring, |d| {
                d.start(opcode::Recv::new(types::Fd(fd), ptr, BUF as u32).build())
            })?;
            self.rx = Rx::Own(op, own);
            return Ok(None);
        }
        if r <= 0 {
            if let Some(b) = b {
                with(ring, |d| d.give_back(b))?;
            }
            if r < 0 {
                return Err(io::Error::from_raw_os_error(-r));
            }
            self.rx = Rx::Eof;
            return Ok(None);
        }
        let Some(b) = b else {
            return Err(io::Error::other("io_uring: a receive without a buffer"));
        };
        self.streaming = r as usize == BUF;
        self.rx = Rx::Held {
            buf: b,
            pos: 0,
            end: r as usize,
        };
        Ok(None)
    }

    /// Nothing held: while streaming, a plain non-blocking recv(2) straight into `buf`; else a
    /// receive into the ring, which completes on the driver's next turn at the earliest.
    fn receive(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let fd = self.fd.as_raw_fd();
        if self.streaming && buf.remaining() > 0 {
            let room = buf.remaining();
            // SAFETY: recv(2) only writes (at most `room` bytes) into the unfilled part; it
            // never de-initializes anything.
            let n = unsafe {
                let unfilled = buf.unfilled_mut();
                libc::recv(fd, unfilled.as_mut_ptr().cast(), room, libc::MSG_DONTWAIT)
            };
            if n >= 0 {
                let n = n as usize;
                // SAFETY: the kernel initialized the first `n` bytes.
                unsafe { buf.assume_init(n) };
                buf.advance(n);
                self.streaming = n == room;
                if n == 0 {
                    self.rx = Rx::Eof;
                }
                return Poll::Ready(Ok(()));
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::WouldBlock {
                return Poll::Ready(Err(e));
            }
            self.streaming = false;
        }
        let started = with(self.ring, |d| {
            d.start(
                opcode::Recv::new(types::Fd(fd), std::ptr::null_mut(), BUF as u32)
                    .buf_group(GROUP)
                    // The socket was found empty (the last receive did not fill its buffer,
                    // or the direct one found nothing): the bytes to come are not there yet,
                    // and a try now would take a buffer and the socket's lock for nothing.
                    .ioprio(POLL_FIRST)
                    .build()
                    .flags(squeue::Flags::BUFFER_SELECT),
            )
        });
        let op = match started {
            Ok(op) => op,
            Err(e) => return Poll::Ready(Err(e)),
        };
        self.rx = Rx::Ring(op);
        // It sets the waker; a completion cannot be there before the driver's turn.
        match take(self.ring, op, cx) {
            Err(e) => Poll::Ready(Err(e)),
            Ok(None) => Poll::Pending,
            Ok(Some(_)) => Poll::Ready(Err(io::Error::other("io_uring: completed unsubmitted"))),
        }
    }
}

/// A read whose operation has not completed (`got`, from `take`): Pending, or the error; the
/// operation stays the stream's, for Drop to cancel.
fn waiting(got: io::Result<Option<(i32, u32)>>) -> Poll<io::Result<()>> {
    match got {
        Err(e) => Poll::Ready(Err(e)),
        Ok(_) => Poll::Pending,
    }
}

impl AsyncWrite for UringStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.poll_sent(cx)?.is_pending() {
            return Poll::Pending;
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total > DIRECT_SEND {
            if let Some(n) = this.send_now(bufs)? {
                return Poll::Ready(Ok(n));
            }
        }
        this.wbuf.reserve(total);
        for b in bufs {
            this.wbuf.extend_from_slice(b);
        }
        if total > 0 {
            this.start_send()?;
        }
        Poll::Ready(Ok(total))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    /// Flushing waits for nothing: the bytes a write took are the ring's to send at the
    /// worker's next enter, whatever the caller does next, as a TCP socket's are the kernel's
    /// (tokio's `TcpStream` flushes nothing either). A send that failed is reported here if it
    /// has completed, else by the next write or shutdown (the connection's reads fail beside
    /// it). Waiting for the completion cost every exchange one more wake of its task: a
    /// request's send completes a round before its answer comes, an answer's before the
    /// client's next request.
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().settle(None) {
            Poll::Pending => Poll::Ready(Ok(())),
            done => done,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.poll_sent(cx)?.is_pending() {
            return Poll::Pending;
        }
        // SAFETY: shutdown(2) on a descriptor this stream owns.
        if unsafe { libc::shutdown(this.fd.as_raw_fd(), libc::SHUT_WR) } < 0 {
            return Poll::Ready(Err(io::Error::last_os_error()));
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for UringStream {
    fn drop(&mut self) {
        let (held, rop) = match std::mem::replace(&mut self.rx, Rx::Eof) {
            Rx::Held { buf, .. } => (Some(buf), (None, Vec::new())),
            Rx::Ring(op) => (None, (Some(op), Vec::new())),
            Rx::Own(op, bytes) => (None, (Some(op), bytes)),
            Rx::Idle | Rx::OwnHeld { .. } | Rx::Eof => (None, (None, Vec::new())),
        };
        let gone = Gone {
            // SAFETY: taken once, here; the field is never used again.
            fd: unsafe { std::mem::ManuallyDrop::take(&mut self.fd) },
            held,
            ops: [rop, (self.wop.take(), std::mem::take(&mut self.wbuf))],
        };
        if ring_id() == Some(self.ring) {
            DRIVER.with(move |d| {
                if let Some(d) = d.borrow_mut().as_mut() {
                    d.abandon(gone);
                }
            });
            return;
        }
        // Another thread: the ring's own driver sees to it.
        let mailbox = MAILBOXES
            .locked()
            .iter()
            .find(|m| m.ring == self.ring)
            .cloned();
        match mailbox {
            Some(m) => {
                m.gone.locked().push(gone);
                if let Some(w) = m.waker.locked().take() {
                    w.wake();
                }
            }
            None => {
                // The driver is gone (its ring leaked, submitting nothing more): nothing queued
                // can reach the kernel now, but the bytes of what did may still be used.
                for (_, buf) in gone.ops {
                    std::mem::forget(buf);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The driver's slot, cancel and descriptor lifetimes, on a real ring and real sockets,
    //! step by step on one thread (the driver runs only when the test yields).

    use super::*;
    use std::io::{Read, Write};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A runtime with this thread's ring installed; None (and why) where the kernel refuses one.
    fn ring_runtime() -> Option<tokio::runtime::Runtime> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        match rt.block_on(async { install() }) {
            Ok(()) => Some(rt),
            Err(e) => {
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "this kernel refuses io_uring, under CI: {e}"
                );
                eprintln!("skipped: this kernel refuses io_uring: {e}");
                None
            }
        }
    }

    /// A connected pair: the ring's stream and the blocking peer.
    async fn pair(l: &std::net::TcpListener) -> (UringStream, std::net::TcpStream) {
        let s = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (peer, _) = l.accept().unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        (UringStream::from_tokio(s).unwrap(), peer)
    }

    /// Which file `fd` names now (device and inode), if it is open. Tests in the same process
    /// open sockets of their own, so a number alone may be reused by another test: compare
    /// what it names.
    fn file_of(fd: RawFd) -> Option<(u64, u64)> {
        // SAFETY: fstat writes one stat through a valid pointer; a closed number fails.
        unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            (libc::fstat(fd, &mut st) == 0).then_some((st.st_dev, st.st_ino))
        }
    }

    /// Whether `fd` still names the file it named as `was`.
    fn still_open(fd: RawFd, was: Option<(u64, u64)>) -> bool {
        was.is_some() && file_of(fd) == was
    }

    /// A closing answer's last bytes wait in the socket and leave with the FIN (one segment,
    /// not two): nothing reaches the peer before the shutdown, all of it and the end after.
    #[test]
    fn held_bytes_leave_with_the_shutdown() {
        use crate::net::Transport;
        let Some(rt) = ring_runtime() else { return };
        rt.block_on(async {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            // Small (through the ring's send) and large (sent at once, from the caller's bytes).
            for len in [13, 3 * DIRECT_SEND + 7] {
                let (mut s, mut peer) = pair(&l).await;
                s.hold_for_close();
                let sent: Vec<u8> = (0..len).map(|i| i as u8).collect();
                s.write_all(&sent).await.unwrap();
                s.flush().await.unwrap();
                // The ring's send has run (the driver turned while the test slept).
                tokio::time::sleep(Duration::from_millis(50)).await;
                peer.set_nonblocking(true).unwrap();
                let mut buf = vec![0u8; 64 * 1024];
                let early = match peer.read(&mut buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                    got => got.unwrap(),
                };
                // Both under a loopback segment: none of it goes before the FIN.
                assert_eq!(early, 0, "{len} bytes: {early} left before the shutdown");
                s.shutdown().await.unwrap();
                peer.set_nonblocking(false).unwrap();
                let mut got = buf[..early].to_vec();
                peer.read_to_end(&mut got).unwrap();
                assert_eq!(got, sent, "{len} bytes: all of it, then the end");
            }
        });
    }

    /// A flush waits for no send in flight (the ring sends what a write took at the driver's
    /// next turn, whatever the writer does); between exchanges the send's buffer goes; a send
    /// that failed shows at the next flush once it has completed.
    #[test]
    fn a_flush_waits_for_no_send_and_a_failed_one_shows_after() {
        use std::future::Future;
        let Some(rt) = ring_runtime() else { return };
        rt.block_on(async {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let (mut s, mut peer) = pair(&l).await;
            s.write_all(b"hello").await.unwrap();
            // Queued, not submitted: the driver has not run since (no yield).
            assert!(s.wop.is_some(), "the send is in flight");
            let mut flush = std::pin::pin!(s.flush());
            let first = poll_fn(|cx| Poll::Ready(flush.as_mut().poll(cx))).await;
            assert!(matches!(first, Poll::Ready(Ok(()))), "{first:?}");
            // The driver's turn sends it.
            let mut got = [0u8; 5];
            tokio::time::sleep(Duration::from_millis(20)).await;
            peer.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"hello");
            // Between exchanges the stream lets go of the sent bytes' buffer.
            assert!(
                s.wbuf.capacity() > 0,
                "the sent bytes' buffer is kept until then"
            );
            crate::net::Transport::let_go(&mut s).unwrap();
            assert!(
                s.wop.is_none() && s.wbuf.capacity() == 0,
                "a send buffer kept"
            );
            // The peer resets the connection; a send after that fails, and says so once done.
            socket2::SockRef::from(&peer)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
            drop(peer);
            tokio::time::sleep(Duration::from_millis(20)).await;
            s.write_all(b"after").await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            let after = s.flush().await;
            assert!(after.is_err(), "a failed send went unreported: {after:?}");
        });
    }

    #[test]
    fn a_dropped_streams_queued_send_never_reaches_the_next_socket_on_its_number() {
        let Some(rt) = ring_runtime() else { return };
        rt.block_on(async {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let (mut a, mut a_peer) = pair(&l).await;
            let a_fd = a.fd.as_raw_fd();
            let a_file = file_of(a_fd);
            // Queued on the ring, not yet submitted: the driver has not run since.
            a.write_all(b"from A").await.unwrap();
            drop(a);
            assert!(
                still_open(a_fd, a_file),
                "closed while a queued send names it"
            );
            // A new socket at once (no yield): it must not get A's number.
            let b = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
            assert_ne!(b.as_raw_fd(), a_fd);
            let (mut b_peer, _) = l.accept().unwrap();
            b_peer
                .set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            // Let the driver submit, reap and close.
            for _ in 0..20 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let mut got = [0u8; 16];
            let n = b_peer.read(&mut got).unwrap_or(0);
            assert_eq!(&got[..n], b"", "B's peer got A's bytes");
            // A's peer sees A's bytes or nothing (cancelled), then the close.
            let mut rest = Vec::new();
            let _ = a_peer.read_to_end(&mut rest);
            assert!(rest.is_empty() || rest == b"from A", "{rest:?}");
            assert!(!still_open(a_fd, a_file), "A's socket never closed");
            drop(b);
        });
    }

    #[test]
    fn a_dropped_streams_parked_receive_never_swallows_the_next_sockets_data() {
        let Some(rt) = ring_runtime() else { return };
        rt.block_on(async {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let (mut a, _a_peer) = pair(&l).await;
            let a_fd = a.fd.as_raw_fd();
            let a_file = file_of(a_fd);
            // A receive in flight (parked: nothing to read).
            let mut buf = [0u8; 16];
            let read = tokio::time::timeout(Duration::from_millis(50), a.read(&mut buf)).await;
            assert!(read.is_err(), "nothing was sent to A");
            drop(a);
            assert!(still_open(a_fd, a_file), "closed while a receive names it");
            // The cancel completes, then the number is free; a new ring stream on it gets its
            // own data.
            for _ in 0..20 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert!(
                !still_open(a_fd, a_file),
                "A's socket never closed after its receive was cancelled"
            );
            let (mut b, mut b_peer) = pair(&l).await;
            b_peer.write_all(b"to B").unwrap();
            let mut got = [0u8; 4];
            tokio::time::timeout(Duration::from_secs(2), b.read_exact(&mut got))
                .await
                .expect("B's data")
                .unwrap();
            assert_eq!(&got, b"to B");
        });
    }

    #[test]
    fn a_stream_dropped_on_another_thread_is_closed_by_its_driver() {
        let Some(rt) = ring_runtime() else { return };
        rt.block_on(async {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let (mut a, mut a_peer) = pair(&l).await;
            let a_fd = a.fd.as_raw_fd();
            let a_file = file_of(a_fd);
            let mut buf = [0u8; 16];
            let read = tokio::time::timeout(Duration::from_millis(50), a.read(&mut buf)).await;
            assert!(read.is_err());
            std::thread::spawn(move || drop(a)).join().unwrap();
            // The driver adopts it: the receive is cancelled, the socket closes, the peer sees
            // the end of the stream.
            let mut closed = false;
            for _ in 0..100 {
                tokio::time::sleep(Duration::from_millis(10)).await;
                if !still_open(a_fd, a_file) {
                    closed = true;
                    break;
                }
            }
            assert!(closed, "a stream dropped off its worker was leaked");
            let mut rest = Vec::new();
            assert_eq!(a_peer.read_to_end(&mut rest).unwrap(), 0);
        });
    }

    #[test]
    fn user_data_carries_the_slot_and_its_generation() {
        let ud = user_data(7, 3);
        assert_eq!(ud & u64::from(u32::MAX), 7);
        assert_eq!(ud >> 32, 3);
        assert_ne!(user_data(7, 3), user_data(7, 4));
        assert_ne!(user_data(0, 0), UNWATCHED);
        assert_ne!(user_data(u32::MAX as usize, u32::MAX), UNWATCHED);
        assert_eq!(
            user_data(1, GENERATIONS + 1) >> 32,
            0,
            "generations wrap in 31 bits"
        );
    }
}
