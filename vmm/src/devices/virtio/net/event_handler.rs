//! The device threads. One thread per queue pair: each pair has its own
//! TAP queue fd, so pairs share nothing and scale across host cores (with
//! one pair, as most guests use, it is the single epoll loop). The control
//! queue rides on pair 0's thread. A thread serves its job (a pair's
//! queues, or a vhost relay) one batch of events at a time, each under
//! the lock of the slot the job sits in; pausing the device takes the job
//! out of the slot between two batches, which wakes nobody, and frames
//! arriving meanwhile wait in the TAP.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::super::{ActiveQueue, GuestMemory, Interrupt};
use super::backend::{FrameIo, RemoteDatapath};
use net_datapath::counters::CounterCell;
use net_datapath::datapath::{MAX_FRAME_LEN, NetStats, RxState};
use net_datapath::queue_pair::{
    RingCtx, RxStatus, serve_ctrl, serve_ctrl_switching, serve_rx, serve_tx,
};

/// Called first thing in every device thread with the thread's name: the
/// VMM installs the thread's seccomp filter (and drops anything else) here.
pub type ThreadHook = Arc<dyn Fn(&str) + Send + Sync>;

/// The system calls a device thread makes once its hook ran (serving the
/// queues, switching TAP queues, stopping), for its seccomp allow-list.
/// `ioctl` needs only `net_datapath::tap::DATAPATH_IOCTLS` (first argument: request).
/// `unit tests` run the device under exactly this list.
pub const DEVICE_THREAD_SYSCALLS: &[libc::c_long] = &[
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_read,
    libc::SYS_write,
    // The TAP datapath: frames scattered straight into / gathered from guest memory.
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_ioctl,
    libc::SYS_futex,
    libc::SYS_close,
    // Debug builds of std check an fd with F_GETFD before closing it.
    libc::SYS_fcntl,
    libc::SYS_sched_yield,
    // Memory, and the thread's own exit.
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_exit,
];

/// The thread's own eventfd: look at the slot again (a new job, or the
/// device is going away).
const POKE: u64 = 0;
const RX_KICK: u64 = 1;
const TX_KICK: u64 = 2;
const BACKEND: u64 = 3;
const CTRL_KICK: u64 = 4;

/// The control queue and what it needs to switch queue pairs.
pub struct CtrlQueue {
    pub queue: ActiveQueue,
    /// Every pair's frame I/O, to attach/detach TAP queues.
    pub all_io: Vec<Arc<dyn FrameIo>>,
    pub broken: bool,
}

/// Everything one queue pair's thread serves; taken back, queues and a
/// frame in flight included, when the device pauses.
pub struct PairWorker {
    pub pair: usize,
    pub rx: ActiveQueue,
    pub tx: ActiveQueue,
    pub ctrl: Option<CtrlQueue>,
    pub io: Arc<dyn FrameIo>,
    pub mem: GuestMemory,
    pub interrupt: Arc<Interrupt>,
    pub mrg_rxbuf: bool,
    pub active_pairs: Arc<AtomicU16>,
    pub max_pairs: u16,
    pub rx_state: RxState,
    pub rx_broken: bool,
    pub tx_broken: bool,
    /// This pair's counters: plain integers, this thread's alone.
    pub stats: NetStats,
    /// Where `stats` is published once per batch for the API thread.
    cell: Arc<CounterCell>,
    tx_buf: Vec<u8>,
    /// Where rx stood after the last batch.
    rx_status: RxStatus,
}

/// A queue pair's two bounce buffers: the rx spill buffer and the one
/// for tx chains too fragmented for one writev (`MAX_FRAME_LEN` each).
/// The device makes them with itself and lends them to each activation:
/// a migration's restore activates the queues while the guest is paused,
/// and allocating the two (zeroed, 64 KiB each) there cost about 60 us on
/// this host.
pub struct PairBuffers {
    rx: Vec<u8>,
    tx: Vec<u8>,
}

impl Default for PairBuffers {
    fn default() -> Self {
        PairBuffers {
            rx: vec![0; MAX_FRAME_LEN],
            tx: vec![0; MAX_FRAME_LEN],
        }
    }
}

impl PairWorker {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        pair: usize,
        rx: ActiveQueue,
        tx: ActiveQueue,
        ctrl: Option<CtrlQueue>,
        io: Arc<dyn FrameIo>,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        mrg_rxbuf: bool,
        active_pairs: Arc<AtomicU16>,
        max_pairs: u16,
        buffers: PairBuffers,
    ) -> Self {
        Self {
            pair,
            rx,
            tx,
            ctrl,
            io,
            mem,
            interrupt,
            mrg_rxbuf,
            active_pairs,
            max_pairs,
            rx_state: RxState::with_buffer(buffers.rx),
            rx_broken: false,
            tx_broken: false,
            stats: NetStats::default(),
            cell: Arc::new(CounterCell::default()),
            tx_buf: buffers.tx,
            rx_status: RxStatus::Idle,
        }
    }

    /// The bounce buffers back, for the device's next activation.
    pub fn into_buffers(self) -> PairBuffers {
        PairBuffers {
            rx: self.rx_state.into_buffer(),
            tx: self.tx_buf,
        }
    }

    /// Counting goes on from `stats` (this pair's totals so far), published
    /// in `cell`.
    pub fn with_counters(mut self, stats: NetStats, cell: Arc<CounterCell>) -> Self {
        self.stats = stats;
        cell.publish(&stats);
        self.cell = cell;
        self
    }

    /// Whether the driver acked guest TSO/UFO (64 KiB rx frames): sets how
    /// much rx buffer space is lined up per read.
    pub fn with_guest_gso(mut self, gso: bool) -> Self {
        self.rx_state.set_guest_gso(gso);
        self
    }

    /// A frame a migrated device had read but not delivered (vnet header
    /// first); it goes to the guest before anything newer.
    pub fn with_pending_rx(mut self, frame: Option<&[u8]>) -> Self {
        if let Some(f) = frame.filter(|f| !f.is_empty())
            && !self.rx_state.set_pending_frame(f)
        {
            log::warn!(
                "virtio-net pair {}: migrated rx frame of {} bytes dropped",
                self.pair,
                f.len()
            );
        }
        self
    }

    /// Serves rx (`net_datapath::queue_pair::serve_rx`).
    pub fn handle_rx(&mut self) -> RxStatus {
        let cx = RingCtx {
            mem: &self.mem,
            io: &*self.io,
            notify: &*self.interrupt,
            pair: self.pair,
        };
        serve_rx(
            &mut self.rx.queue,
            &cx,
            &mut self.rx_state,
            self.mrg_rxbuf,
            &mut self.rx_broken,
            &mut self.stats,
        )
    }

    /// Serves tx (`net_datapath::queue_pair::serve_tx`).
    pub fn handle_tx(&mut self) {
        let cx = RingCtx {
            mem: &self.mem,
            io: &*self.io,
            notify: &*self.interrupt,
            pair: self.pair,
        };
        serve_tx(
            &mut self.tx.queue,
            &cx,
            &mut self.tx_buf,
            &mut self.tx_broken,
            &mut self.stats,
        );
    }

    pub fn handle_ctrl(&mut self) {
        if let Some(ctrl) = self.ctrl.as_mut() {
            serve_ctrl(
                &mut ctrl.queue.queue,
                &self.mem,
                &ctrl.all_io,
                self.max_pairs,
                &self.active_pairs,
                &*self.interrupt,
                &mut ctrl.broken,
                &mut self.stats,
            );
        }
    }

    /// The next wait: after a full rx batch, only look for other work.
    fn timeout(&self) -> i32 {
        if self.rx_status == RxStatus::More {
            0
        } else {
            -1
        }
    }
}

impl Serve for PairWorker {
    fn setup(&mut self, poke: &EventFd) -> std::io::Result<Epoll> {
        let epoll = Epoll::new()?;
        let add = |fd: i32, data: u64, ev: EventSet| {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(ev, data))
        };
        add(poke.as_raw_fd(), POKE, EventSet::IN)?;
        add(self.rx.kick.as_raw_fd(), RX_KICK, EventSet::IN)?;
        add(self.tx.kick.as_raw_fd(), TX_KICK, EventSet::IN)?;
        // Edge-triggered: rx drains the backend to EAGAIN, or waits for a kick.
        add(
            self.io.as_raw_fd(),
            BACKEND,
            EventSet::IN | EventSet::EDGE_TRIGGERED,
        )?;
        if let Some(c) = &self.ctrl {
            add(c.queue.kick.as_raw_fd(), CTRL_KICK, EventSet::IN)?;
        }
        Ok(epoll)
    }

    /// Work queued before the thread started (or while it was paused).
    fn begin(&mut self, _: &Epoll) -> i32 {
        self.handle_tx();
        self.rx_status = self.handle_rx();
        self.handle_ctrl();
        self.cell.publish(&self.stats);
        self.timeout()
    }

    fn batch(&mut self, events: &[EpollEvent], _: &Epoll) -> i32 {
        let mut rx_served = false;
        for ev in events {
            match ev.data() {
                RX_KICK => {
                    let _ = self.rx.kick.read();
                    self.rx_status = self.handle_rx();
                    rx_served = true;
                }
                // While a frame waits for buffers, only a kick helps.
                BACKEND if self.rx_status != RxStatus::WaitingForBuffers => {
                    self.rx_status = self.handle_rx();
                    rx_served = true;
                }
                TX_KICK => {
                    let _ = self.tx.kick.read();
                    self.handle_tx();
                }
                CTRL_KICK => {
                    if let Some(c) = &self.ctrl {
                        let _ = c.queue.kick.read();
                    }
                    self.handle_ctrl();
                }
                _ => {}
            }
        }
        if self.rx_status == RxStatus::More && !rx_served {
            self.rx_status = self.handle_rx();
        }
        self.cell.publish(&self.stats);
        self.timeout()
    }

    fn fail(&mut self, what: &str, err: std::io::Error) {
        log::error!("virtio-net pair {}: {what}: {err}", self.pair);
        self.interrupt.set_needs_reset();
    }
}

/// With vhost-net (the kernel) or vhost-user (a backend process) moving
/// the frames, this thread relays the per-ring call events to the device's
/// interrupt and serves the control queue. For vhost-user it also watches
/// the backend's connection: when the backend goes away the link goes
/// down (a config interrupt tells the driver), and the thread reconnects,
/// backing off up to [`RECONNECT_MAX`], for as long as the VM lives.
/// Taken back, rings included, when the device pauses.
pub struct VhostRelay {
    pub rings: Vec<ActiveQueue>,
    pub calls: Vec<Arc<EventFd>>,
    pub remote: Option<Arc<dyn RemoteDatapath>>,
    pub ctrl: Option<CtrlQueue>,
    pub mem: GuestMemory,
    pub interrupt: Arc<Interrupt>,
    pub active_pairs: Arc<AtomicU16>,
    pub max_pairs: u16,
    /// Per pair, what this thread can see: interrupts relayed (the kernel
    /// already left out those EVENT_IDX saved) and control-queue bad
    /// chains (pair 0). Frames, bytes and drops are the kernel's.
    pub stats: Vec<NetStats>,
    pub cells: Vec<Arc<CounterCell>>,
    /// The backend connection this thread's epoll watches, and the
    /// reconnection backoff (both reset with each new epoll).
    pub(super) watch: Watch,
}

const CALL_BASE: u64 = 100;
const REMOTE: u64 = 5;

/// The first wait before reconnecting to a vhost-user backend, doubled
/// after each failed attempt up to [`RECONNECT_MAX`].
pub const RECONNECT_FIRST: Duration = Duration::from_millis(50);
/// The longest wait between two reconnection attempts.
pub const RECONNECT_MAX: Duration = Duration::from_secs(2);

/// The connection being watched, and the wait before the next attempt
/// while there is none.
pub(super) struct Watch {
    current: Option<(u64, RawFd)>,
    backoff: Duration,
}

impl Default for Watch {
    fn default() -> Self {
        Watch {
            current: None,
            backoff: RECONNECT_FIRST,
        }
    }
}

impl VhostRelay {
    fn publish(&self) {
        for (c, s) in self.cells.iter().zip(&self.stats) {
            c.publish(s);
        }
    }

    /// Keeps the epoll registration on the remote's current connection;
    /// returns the next wait's timeout (-1: until an event comes; the
    /// backoff while there is no connection).
    fn sync_watch(&mut self, epoll: &Epoll) -> i32 {
        let Some(remote) = self.remote.as_ref() else {
            return -1;
        };
        let w = &mut self.watch;
        let now = remote.watch();
        if now != w.current {
            if let Some((_, fd)) = w.current.take() {
                // Gone already when the old connection's fd was closed.
                let _ = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
            }
            if let Some((_, fd)) = now {
                let ev = EpollEvent::new(EventSet::IN | EventSet::READ_HANG_UP, REMOTE);
                if let Err(e) = epoll.ctl(ControlOperation::Add, fd, ev) {
                    log::warn!("vhost-user relay: cannot watch the backend connection: {e}");
                }
            }
            w.current = now;
        }
        match w.current {
            Some(_) => -1,
            None => i32::try_from(w.backoff.as_millis()).unwrap_or(i32::MAX),
        }
    }

    /// No connection and the wait is over: try again.
    fn try_reconnect(&mut self) {
        let Some(remote) = &self.remote else { return };
        if remote.reconnect() {
            self.watch.backoff = RECONNECT_FIRST;
            // The link is up again: the driver rereads the config space.
            self.interrupt.signal_config();
            // Completions the backend made before it died may have been
            // signalled on a call fd nobody read; look again.
            self.interrupt.signal_used_queue();
        } else {
            self.watch.backoff = (self.watch.backoff * 2).min(RECONNECT_MAX);
        }
    }

    fn serve_ctrl(&mut self) {
        let remote = self.remote.clone();
        let active = self.active_pairs.clone();
        if let (Some(c), Some(s), Some(r)) = (self.ctrl.as_mut(), self.stats.first_mut(), remote) {
            // The backend's rings follow the driver's pairs.
            let _ = c.queue.kick.read();
            let mut switch = |n: u16| {
                let ok = r.set_active_pairs(n);
                if ok {
                    active.store(n, Ordering::SeqCst);
                }
                ok
            };
            serve_ctrl_switching(
                &mut c.queue.queue,
                &self.mem,
                self.max_pairs,
                &mut switch,
                &*self.interrupt,
                &mut c.broken,
                s,
            );
        } else if let (Some(c), Some(s)) = (self.ctrl.as_mut(), self.stats.first_mut()) {
            let _ = c.queue.kick.read();
            serve_ctrl(
                &mut c.queue.queue,
                &self.mem,
                &c.all_io,
                self.max_pairs,
                &self.active_pairs,
                &*self.interrupt,
                &mut c.broken,
                s,
            );
        }
    }
}

impl Serve for VhostRelay {
    fn setup(&mut self, poke: &EventFd) -> std::io::Result<Epoll> {
        let epoll = Epoll::new()?;
        let add = |fd: i32, data: u64| {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, data),
            )
        };
        add(poke.as_raw_fd(), POKE)?;
        for (i, c) in self.calls.iter().enumerate() {
            add(c.as_raw_fd(), CALL_BASE + i as u64)?;
        }
        if let Some(c) = &self.ctrl {
            add(c.queue.kick.as_raw_fd(), CTRL_KICK)?;
        }
        // A new epoll watches nothing yet, and a resumed relay tries a
        // missing backend again soon, as a newly started one does.
        self.watch = Watch::default();
        Ok(epoll)
    }

    fn begin(&mut self, epoll: &Epoll) -> i32 {
        self.sync_watch(epoll)
    }

    fn batch(&mut self, events: &[EpollEvent], epoll: &Epoll) -> i32 {
        // No event: the backoff without a connection is over.
        if events.is_empty() && self.watch.current.is_none() {
            self.try_reconnect();
            return self.sync_watch(epoll);
        }
        for ev in events {
            match ev.data() {
                POKE => {}
                REMOTE => {
                    if let Some(r) = &self.remote
                        && !r.check()
                    {
                        // The link is down: tell the driver.
                        self.interrupt.signal_config();
                        self.watch.backoff = RECONNECT_FIRST;
                    }
                }
                CTRL_KICK => self.serve_ctrl(),
                d => {
                    let ring = d.checked_sub(CALL_BASE).unwrap_or(u64::MAX) as usize;
                    if let Some(c) = self.calls.get(ring) {
                        let _ = c.read();
                        self.interrupt.signal_used_queue();
                        if let Some(s) = self.stats.get_mut(ring / 2) {
                            s.interrupts += 1;
                        }
                    }
                }
            }
        }
        self.publish();
        self.sync_watch(epoll)
    }

    fn fail(&mut self, what: &str, err: std::io::Error) {
        log::error!("vhost relay: {what}: {err}");
        self.interrupt.set_needs_reset();
    }
}

/// A job served by a device thread, one batch of events at a time, each
/// under the lock of the thread's slot.
trait Serve {
    /// A new epoll with the job's fds and `poke` (as [`POKE`]) in it.
    fn setup(&mut self, poke: &EventFd) -> std::io::Result<Epoll>;
    /// Serves what was queued before the thread (re)started; returns the
    /// next wait's timeout in ms (-1: none).
    fn begin(&mut self, epoll: &Epoll) -> i32;
    /// Serves one batch (empty: the wait timed out); returns the next
    /// wait's timeout.
    fn batch(&mut self, events: &[EpollEvent], epoll: &Epoll) -> i32;
    /// The thread cannot go on serving: the driver must reset the device.
    fn fail(&mut self, what: &str, err: std::io::Error);
}

/// Work handed to a device thread.
pub enum Job {
    Pair(Box<PairWorker>),
    Relay(Box<VhostRelay>),
}

impl Job {
    fn serve(&mut self) -> &mut dyn Serve {
        match self {
            Job::Pair(w) => &mut **w,
            Job::Relay(r) => &mut **r,
        }
    }
}

/// Where a device thread finds its job.
struct Slot {
    job: Option<Job>,
    /// Bumped whenever a job is put in or taken out: a thread serves a job
    /// only while the number it started it under holds.
    generation: u64,
    /// The device is gone: the thread ends.
    closed: bool,
}

struct Shared {
    slot: Mutex<Slot>,
    /// The thread waits here for a job (or for its failed job to be taken).
    changed: Condvar,
    /// Wakes the thread out of its epoll wait to look at the slot again.
    poke: EventFd,
    /// Someone waits to take the job: the thread does not take the slot's
    /// lock again meanwhile (a thread serving a stream of frames would
    /// otherwise win the lock back each time it lets go).
    taking: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The thread's life: wait for a job, serve it batch by batch until it
    /// is taken away, again.
    fn serve_jobs(&self) {
        let mut events = vec![EpollEvent::default(); 16];
        let mut g = self.lock();
        loop {
            while g.job.is_none() && !g.closed {
                g = self.changed.wait(g).unwrap_or_else(|p| p.into_inner());
            }
            if g.closed {
                return;
            }
            let generation = g.generation;
            // The poke that came with this job: seen.
            let _ = self.poke.read();
            let Some(job) = g.job.as_mut().map(Job::serve) else {
                continue;
            };
            let (epoll, mut timeout) = match job.setup(&self.poke) {
                Ok(e) => {
                    let t = job.begin(&e);
                    (e, t)
                }
                Err(e) => {
                    job.fail("epoll setup", e);
                    g = self.until_changed(g, generation);
                    continue;
                }
            };
            drop(g);
            g = loop {
                let r = epoll.wait(timeout, &mut events);
                while self.taking.load(Ordering::Acquire) {
                    std::thread::yield_now();
                }
                let mut g = self.lock();
                if g.generation != generation || g.closed {
                    break g;
                }
                let Some(job) = g.job.as_mut().map(Job::serve) else {
                    break g;
                };
                timeout = match r {
                    Ok(n) => {
                        let events = events.get(..n).unwrap_or_default();
                        if events.iter().any(|e| e.data() == POKE) {
                            let _ = self.poke.read();
                        }
                        job.batch(events, &epoll)
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => timeout,
                    Err(e) => {
                        job.fail("epoll_wait", e);
                        break self.until_changed(g, generation);
                    }
                };
            };
        }
    }

    /// A failed job stays in the slot until it is taken or replaced.
    fn until_changed<'a>(
        &self,
        mut g: MutexGuard<'a, Slot>,
        generation: u64,
    ) -> MutexGuard<'a, Slot> {
        while g.generation == generation && !g.closed {
            g = self.changed.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        g
    }
}

/// A long-lived device thread. It is created before the VMM sandboxes
/// itself (`NetDevice::start_threads`), runs its hook once, then serves one
/// job at a time: activation and resume put a job in its slot, pause takes
/// it out. So activating a device (on a vCPU thread, at the driver's
/// DRIVER_OK) spawns nothing and needs no thread-creation syscalls.
pub struct DeviceThread {
    shared: Arc<Shared>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl DeviceThread {
    pub fn spawn(name: String, hook: Option<ThreadHook>) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            slot: Mutex::new(Slot {
                job: None,
                generation: 0,
                closed: false,
            }),
            changed: Condvar::new(),
            poke: EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK)?,
            taking: AtomicBool::new(false),
        });
        let thread_shared = shared.clone();
        let handle = crate::thread_start::spawn(
            std::thread::Builder::new().name(name.clone()),
            move || {
                if let Some(hook) = hook {
                    hook(&name);
                }
            },
            move |()| thread_shared.serve_jobs(),
        )?;
        Ok(Self {
            shared,
            handle: Some(handle),
        })
    }

    /// Starts `job`; gives it back if the thread is gone.
    pub fn start(&self, job: Job) -> Result<(), Job> {
        if self.handle.as_ref().is_none_or(|h| h.is_finished()) {
            return Err(job);
        }
        let mut g = self.shared.lock();
        g.job = Some(job);
        g.generation += 1;
        drop(g);
        self.shared.changed.notify_all();
        // A thread still in the epoll wait of the job taken before.
        let _ = self.shared.poke.write(1);
        Ok(())
    }

    /// Takes the job back, between two of the thread's batches: returns
    /// at once when the thread is waiting for events (it is not woken; it
    /// notices when it next wakes, and waits for a new job), else once
    /// the running batch ends. `None` when there was no job.
    pub fn take(&self) -> Option<Job> {
        self.shared.taking.store(true, Ordering::Release);
        let mut g = self.shared.lock();
        g.generation += 1;
        let job = g.job.take();
        drop(g);
        self.shared.taking.store(false, Ordering::Release);
        job
    }
}

impl Drop for DeviceThread {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.changed.notify_all();
        let _ = self.shared.poke.write(1);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
