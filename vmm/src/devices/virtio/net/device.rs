//! The virtio-net device: what it offers, its config space, and turning the
//! transport's queues into running device threads (userspace TAP) or a
//! kernel datapath (vhost-net).

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};

use virtio_bindings::virtio_net::*;
use virtio_queue::{QueueState, QueueT};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::super::{ActivateError, ActiveQueue, GuestMemory, Interrupt, TYPE_NET, VirtioDevice};
use super::backend::{DatapathError, FrameIo, NetBackend, VringSetup};
use super::event_handler::{
    CtrlQueue, DeviceThread, Job, PairBuffers, PairWorker, ThreadHook, VhostRelay,
};
use net_datapath::counters::{CounterCell, NetStats};
use net_datapath::queue_pair::set_active_pairs;

/// Ring size offered for every queue.
pub const QUEUE_SIZE: u16 = 256;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("the backend has no queue")]
    NoQueues,
    #[error("a device thread died; its queues are lost")]
    ThreadLost,
    #[error("cannot create a device thread: {0}")]
    Thread(std::io::Error),
    #[error("external datapath: {0}")]
    Datapath(#[from] DatapathError),
    #[error("the device is running: pause it first")]
    Running,
    #[error("state: {0}")]
    State(String),
}

fn bit(b: u32) -> u64 {
    1u64 << b
}

/// What the device offers before the backend filters it: what the
/// datapath serves, and the MAC in its config space.
pub fn offered_features(queue_pairs: u16) -> u64 {
    net_datapath::features::datapath_features(queue_pairs) | bit(VIRTIO_NET_F_MAC)
}

/// The relay thread's name: a vhost-user NIC's relay also keeps the
/// connection to its backend, under a seccomp filter of its own (the
/// thread hook picks the filter by this name).
pub fn relay_thread_name(remote: bool) -> &'static str {
    if remote {
        RELAY_VHOST_USER
    } else {
        "vhost-net-relay"
    }
}

/// The name of a vhost-user NIC's relay thread.
pub const RELAY_VHOST_USER: &str = "vhost-user-relay";

/// Threads running, or their state kept while paused.
enum Run {
    Inactive,
    /// Jobs running on the first n device threads.
    UserRunning(usize),
    UserPaused(Vec<PairWorker>),
    ExternalRunning,
    ExternalPaused(Box<VhostRelay>),
}

pub struct NetDevice {
    pub(super) backend: Box<dyn NetBackend>,
    pub(super) mac: [u8; 6],
    pub(super) link_up: bool,
    queue_sizes: Vec<u16>,
    pub(super) avail_features: u64,
    pub(super) acked_features: u64,
    pub(super) active_pairs: Arc<AtomicU16>,
    /// Activation leaves the device paused (a restored device waits for
    /// the VMM's resume).
    pub(super) start_paused: bool,
    /// Pairs the restored driver had enabled, applied at activation.
    pub(super) restored_pairs: Option<u16>,
    /// Frames a migrated device had read but not yet delivered, per pair.
    pub(super) restored_rx: Vec<Vec<u8>>,
    /// A restored device touches its backend (offloads, TAP queue
    /// attachment) only when it resumes: until the migration commits, the
    /// TAP is still the source's.
    backend_setup_on_resume: bool,
    run: Run,
    /// Per queue pair, its counters: published by the pair's worker once
    /// per batch, read here on request; a new worker
    /// goes on from them.
    counters: Vec<Arc<CounterCell>>,
    thread_hook: Option<ThreadHook>,
    threads: Vec<DeviceThread>,
    /// Each pair's bounce buffers while no worker holds them (see
    /// [`PairBuffers`]); none for an external datapath.
    spare_buffers: Vec<PairBuffers>,
}

impl NetDevice {
    /// A device over `backend`. Without a MAC the guest picks its own.
    pub fn new(mut backend: Box<dyn NetBackend>, mac: Option<[u8; 6]>) -> Result<Self, NetError> {
        let pairs = backend.queue_pairs();
        if pairs == 0 {
            return Err(NetError::NoQueues);
        }
        let mut avail = backend.filter_features(offered_features(pairs));
        if mac.is_none() {
            avail &= !bit(VIRTIO_NET_F_MAC);
        }
        let nqueues = 2 * usize::from(pairs) + usize::from(pairs > 1);
        let spare_buffers = if backend.external_datapath().is_some() {
            Vec::new()
        } else {
            (0..pairs).map(|_| PairBuffers::default()).collect()
        };
        Ok(Self {
            backend,
            mac: mac.unwrap_or_default(),
            link_up: true,
            queue_sizes: vec![QUEUE_SIZE; nqueues],
            avail_features: avail,
            acked_features: 0,
            active_pairs: Arc::new(AtomicU16::new(1)),
            start_paused: false,
            restored_pairs: None,
            restored_rx: Vec::new(),
            backend_setup_on_resume: false,
            run: Run::Inactive,
            counters: (0..pairs)
                .map(|_| Arc::new(CounterCell::default()))
                .collect(),
            thread_hook: None,
            threads: Vec::new(),
            spare_buffers,
        })
    }

    pub fn queue_pairs(&self) -> u16 {
        self.backend.queue_pairs()
    }

    /// Runs `hook(thread name)` at the start of every device thread (for
    /// its seccomp filter; see `event_handler::DEVICE_THREAD_SYSCALLS`).
    /// Set it before `start_threads`.
    pub fn set_thread_hook(&mut self, hook: ThreadHook) {
        self.thread_hook = Some(hook);
    }

    /// Creates the device threads (one per queue pair, or one vhost relay)
    /// now, before the VMM sandboxes itself; otherwise the first
    /// activation creates them, on whatever thread activates.
    pub fn start_threads(&mut self) -> Result<(), NetError> {
        if !self.threads.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = if let Some(ext) = self.backend.external_datapath() {
            vec![relay_thread_name(ext.remote().is_some()).into()]
        } else {
            (0..self.queue_pairs())
                .map(|p| format!("virtio-net-q{p}"))
                .collect()
        };
        for name in names {
            let t =
                DeviceThread::spawn(name, self.thread_hook.clone()).map_err(NetError::Thread)?;
            self.threads.push(t);
        }
        Ok(())
    }

    /// Pairs' bounce buffers not lent to a worker.
    #[cfg(test)]
    pub(crate) fn spare_buffers(&self) -> usize {
        self.spare_buffers.len()
    }

    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    pub fn backend(&self) -> &dyn NetBackend {
        &*self.backend
    }

    pub fn is_running(&self) -> bool {
        matches!(self.run, Run::UserRunning(_) | Run::ExternalRunning)
    }

    /// The NIC's counters: the sum of its queue pairs'.
    pub fn stats(&self) -> NetStats {
        self.queue_stats()
            .iter()
            .fold(NetStats::default(), |t, s| t.plus(s))
    }

    /// Each queue pair's counters: exact while paused, as of each pair's
    /// last batch while running.
    pub fn queue_stats(&self) -> Vec<NetStats> {
        self.counters.iter().map(|c| c.load()).collect()
    }

    /// Where a restored device's counters go on from (one per queue pair;
    /// missing pairs start at 0). Before activation only.
    pub(super) fn set_queue_stats(&mut self, stats: &[NetStats]) {
        for (c, s) in self.counters.iter().zip(stats) {
            c.publish(s);
        }
    }

    /// Per pair, the frame a paused device read but has not delivered.
    pub(super) fn pending_rx(&self) -> Vec<Vec<u8>> {
        let Run::UserPaused(workers) = &self.run else {
            return Vec::new();
        };
        let mut out = vec![Vec::new(); usize::from(self.queue_pairs())];
        for w in workers {
            if let (Some(slot), Some(f)) = (out.get_mut(w.pair), w.rx_state.pending_frame()) {
                *slot = f.to_vec();
            }
        }
        while out.last().is_some_and(Vec::is_empty) {
            out.pop();
        }
        out
    }

    fn has_ctrl(&self) -> bool {
        self.queue_pairs() > 1
    }

    fn all_io(&self) -> Vec<Arc<dyn FrameIo>> {
        (0..usize::from(self.queue_pairs()))
            .filter_map(|p| self.backend.frame_io(p))
            .collect()
    }

    /// Stops the device threads' work, keeping queues and a frame in
    /// flight. Frames arriving meanwhile wait in the TAP.
    pub fn pause(&mut self) -> Result<(), NetError> {
        match std::mem::replace(&mut self.run, Run::Inactive) {
            Run::UserRunning(n) => {
                let mut workers = Vec::with_capacity(n);
                let mut lost = false;
                for t in self.threads.get(..n).unwrap_or_default() {
                    match t.take() {
                        Some(Job::Pair(w)) => workers.push(*w),
                        _ => lost = true,
                    }
                }
                self.run = Run::UserPaused(workers);
                if lost {
                    return Err(NetError::ThreadLost);
                }
            }
            Run::ExternalRunning => {
                let t = self.threads.first().ok_or(NetError::ThreadLost)?;
                let Some(Job::Relay(mut relay)) = t.take() else {
                    return Err(NetError::ThreadLost);
                };
                let stopped = self
                    .backend
                    .external_datapath()
                    .map(|k| k.stop())
                    .transpose();
                let bases = match stopped {
                    Ok(b) => b.unwrap_or_default(),
                    Err(e) => {
                        self.run = Run::ExternalPaused(relay);
                        return Err(e.into());
                    }
                };
                for (r, base) in relay.rings.iter_mut().zip(bases) {
                    r.queue.set_next_avail(base);
                    if let Ok(u) = r
                        .queue
                        .used_idx(&*relay.mem, std::sync::atomic::Ordering::Acquire)
                    {
                        r.queue.set_next_used(u.0);
                    }
                }
                self.run = Run::ExternalPaused(relay);
            }
            other => self.run = other,
        }
        Ok(())
    }

    /// Restarts the device threads' work after `pause` (or a restore).
    pub fn resume(&mut self) -> Result<(), NetError> {
        self.start_paused = false;
        self.start_threads()?;
        if std::mem::take(&mut self.backend_setup_on_resume) {
            self.setup_backend(self.active_pairs.load(Ordering::SeqCst))
                .map_err(|e| NetError::State(e.to_string()))?;
        }
        match std::mem::replace(&mut self.run, Run::Inactive) {
            Run::UserPaused(workers) => {
                let n = workers.len();
                if n > self.threads.len() {
                    self.run = Run::UserPaused(workers);
                    return Err(NetError::ThreadLost);
                }
                let mut lost = false;
                for (w, t) in workers.into_iter().zip(&self.threads) {
                    lost |= t.start(Job::Pair(Box::new(w))).is_err();
                }
                self.run = Run::UserRunning(n);
                if lost {
                    return Err(NetError::ThreadLost);
                }
            }
            Run::ExternalPaused(relay) => {
                let acked = self.acked_features;
                let setups: Vec<VringSetup<'_>> = relay
                    .rings
                    .iter()
                    .zip(&relay.calls)
                    .map(|(r, call)| VringSetup {
                        queue: &r.queue,
                        kick: &r.kick,
                        call,
                    })
                    .collect();
                let active = self.active_pairs.load(Ordering::SeqCst);
                let started = match self.backend.external_datapath() {
                    Some(k) => {
                        if let Some(r) = k.remote() {
                            r.set_active_pairs(active);
                        }
                        k.start(&relay.mem, acked, &setups)
                    }
                    None => Ok(()),
                };
                drop(setups);
                if let Err(e) = started {
                    self.run = Run::ExternalPaused(relay);
                    return Err(e.into());
                }
                let Some(t) = self.threads.first() else {
                    self.run = Run::ExternalPaused(relay);
                    return Err(NetError::ThreadLost);
                };
                let interrupt = relay.interrupt.clone();
                if let Err(job) = t.start(Job::Relay(relay)) {
                    if let Job::Relay(r) = job {
                        self.run = Run::ExternalPaused(r);
                    }
                    return Err(NetError::ThreadLost);
                }
                self.run = Run::ExternalRunning;
                // A completion signalled while the rings changed hands
                // went to a call eventfd nobody reads any more (this
                // relay's before the pause, or a migration source's): the
                // driver finds it in the used ring on this interrupt.
                interrupt.signal_used_queue();
            }
            other => self.run = other,
        }
        Ok(())
    }

    /// Offloads the driver acked, and the TAP queues of `pairs` attached.
    fn setup_backend(&mut self, pairs: u16) -> Result<(), ActivateError> {
        self.backend
            .set_offload(self.acked_features)
            .map_err(|e| ActivateError::Backend(format!("TUNSETOFFLOAD: {e}")))?;
        if !set_active_pairs(&self.all_io(), pairs, &self.active_pairs) {
            return Err(ActivateError::Backend(
                "cannot attach/detach TAP queues".into(),
            ));
        }
        Ok(())
    }

    fn config_bytes(&self) -> [u8; 12] {
        let mut c = [0u8; 12];
        c[..6].copy_from_slice(&self.mac);
        let status: u16 = if self.link_up && self.backend.link_up() {
            VIRTIO_NET_S_LINK_UP as u16
        } else {
            0
        };
        c[6..8].copy_from_slice(&status.to_le_bytes());
        c[8..10].copy_from_slice(&self.queue_pairs().to_le_bytes());
        c[10..12].copy_from_slice(&1500u16.to_le_bytes());
        c
    }

    /// The control queue (after the rx/tx pairs) when MQ was negotiated and
    /// the driver set it up.
    fn take_ctrl(&self, queues: &mut [Option<ActiveQueue>]) -> Option<CtrlQueue> {
        if !self.has_ctrl() {
            return None;
        }
        let q = queues
            .get_mut(2 * usize::from(self.queue_pairs()))
            .and_then(Option::take)?;
        Some(CtrlQueue {
            queue: q,
            all_io: self.all_io(),
            broken: false,
        })
    }

    fn build_user(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        mut queues: Vec<Option<ActiveQueue>>,
    ) -> Result<Run, ActivateError> {
        let pairs = usize::from(self.queue_pairs());
        let mut ctrl = self.take_ctrl(&mut queues);
        let mrg = self.acked_features & bit(VIRTIO_NET_F_MRG_RXBUF) != 0;
        let gso = self.acked_features
            & (bit(VIRTIO_NET_F_GUEST_TSO4)
                | bit(VIRTIO_NET_F_GUEST_TSO6)
                | bit(VIRTIO_NET_F_GUEST_UFO))
            != 0;
        let mut workers = Vec::new();
        for p in 0..pairs {
            let rx = queues.get_mut(2 * p).and_then(Option::take);
            let tx = queues.get_mut(2 * p + 1).and_then(Option::take);
            let io = self.backend.frame_io(p);
            match (rx, tx, io) {
                (Some(rx), Some(tx), Some(io)) => workers.push(
                    PairWorker::new(
                        p,
                        rx,
                        tx,
                        if p == 0 { ctrl.take() } else { None },
                        io,
                        mem.clone(),
                        interrupt.clone(),
                        mrg,
                        self.active_pairs.clone(),
                        self.queue_pairs(),
                        self.spare_buffers.pop().unwrap_or_default(),
                    )
                    .with_guest_gso(gso)
                    .with_pending_rx(self.restored_rx.get(p).map(Vec::as_slice))
                    .with_counters(
                        self.counters.get(p).map(|c| c.load()).unwrap_or_default(),
                        self.counters.get(p).cloned().unwrap_or_default(),
                    ),
                ),
                (rx, _, _) if p == 0 => {
                    return Err(ActivateError::MissingQueue(usize::from(rx.is_some())));
                }
                _ => log::debug!("virtio-net: pair {p} not set up by the driver"),
            }
        }
        Ok(Run::UserPaused(workers))
    }

    fn build_external(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        mut queues: Vec<Option<ActiveQueue>>,
    ) -> Result<Run, ActivateError> {
        let pairs = usize::from(self.queue_pairs());
        let ctrl = self.take_ctrl(&mut queues);
        // The kernel serves the pairs the driver set up, in order.
        let mut rings = Vec::new();
        for p in 0..pairs {
            let rx = queues.get_mut(2 * p).and_then(Option::take);
            let tx = queues.get_mut(2 * p + 1).and_then(Option::take);
            match (rx, tx) {
                (Some(rx), Some(tx)) => {
                    rings.push(rx);
                    rings.push(tx);
                }
                (rx, _) if p == 0 => {
                    return Err(ActivateError::MissingQueue(usize::from(rx.is_some())));
                }
                _ => break,
            }
        }
        let calls = rings
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()
            .map_err(ActivateError::EventFd)?;
        let remote = self.backend.external_datapath().and_then(|e| e.remote());
        Ok(Run::ExternalPaused(Box::new(VhostRelay {
            rings,
            calls,
            remote,
            ctrl,
            mem,
            interrupt,
            active_pairs: self.active_pairs.clone(),
            max_pairs: self.queue_pairs(),
            stats: self.queue_stats(),
            cells: self.counters.clone(),
            watch: Default::default(),
        })))
    }
}

impl VirtioDevice for NetDevice {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = self.config_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| c.get(o).copied())
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // virtio 1.x net config is read-only for the driver.
        log::debug!(
            "virtio-net: ignoring {}-byte config write at {offset:#x}",
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        queues: Vec<Option<ActiveQueue>>,
    ) -> Result<(), ActivateError> {
        if !matches!(self.run, Run::Inactive) {
            return Err(ActivateError::AlreadyActive);
        }
        // Until the driver asks for more (VQ_PAIRS_SET), one pair (§5.1.6.5.5).
        let pairs = self.restored_pairs.take().unwrap_or(1);
        if self.start_paused {
            self.active_pairs.store(pairs, Ordering::SeqCst);
            self.backend_setup_on_resume = true;
        } else {
            self.setup_backend(pairs)?;
        }
        let run = if self.backend.external_datapath().is_some() {
            self.build_external(mem, interrupt, queues)?
        } else {
            self.build_user(mem, interrupt, queues)?
        };
        self.run = run;
        if !self.start_paused {
            self.resume()
                .map_err(|e| ActivateError::Backend(e.to_string()))?;
        }
        Ok(())
    }

    fn reset(&mut self) {
        if let Err(e) = self.pause() {
            log::warn!("virtio-net: reset: {e}");
        }
        if let Run::UserPaused(workers) = std::mem::replace(&mut self.run, Run::Inactive) {
            let buffers = workers.into_iter().map(PairWorker::into_buffers);
            self.spare_buffers.extend(buffers);
        }
        self.acked_features = 0;
        let all = self.all_io();
        let n = self.queue_pairs();
        set_active_pairs(&all, n, &self.active_pairs);
        self.active_pairs.store(1, Ordering::SeqCst);
    }

    fn queue_states(&self) -> Option<Vec<Option<QueueState>>> {
        let mut out = vec![None; self.queue_sizes.len()];
        match &self.run {
            Run::UserPaused(workers) => {
                for w in workers {
                    if let Some(s) = out.get_mut(2 * w.pair) {
                        *s = Some(w.rx.queue.state());
                    }
                    if let Some(s) = out.get_mut(2 * w.pair + 1) {
                        *s = Some(w.tx.queue.state());
                    }
                    if let (Some(c), Some(s)) = (&w.ctrl, out.last_mut()) {
                        *s = Some(c.queue.queue.state());
                    }
                }
            }
            Run::ExternalPaused(relay) => {
                for (s, r) in out.iter_mut().zip(&relay.rings) {
                    *s = Some(r.queue.state());
                }
                if let (Some(c), Some(s)) = (&relay.ctrl, out.last_mut()) {
                    *s = Some(c.queue.queue.state());
                }
            }
            _ => return None,
        }
        Some(out)
    }
}

impl Drop for NetDevice {
    fn drop(&mut self) {
        // Threads hold the queues; stop them before the memory goes.
        let _ = self.pause();
    }
}
