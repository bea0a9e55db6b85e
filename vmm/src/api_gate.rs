//! Whether this process answers on the API socket: only the process that
//! owns the guest does. A migration target's gate opens once it took the
//! guest; a source closes its gate before it commits (the socket may be
//! shared with the target, and connections wait in its backlog meanwhile),
//! opens it again if it takes the guest back, and retires it when the
//! target owns the guest.

use std::sync::{Condvar, Mutex, MutexGuard};

/// Whether the API threads may accept connections (see the module doc).
/// A thread waits for the gate to open, waits in poll for a connection,
/// then accepts only if the gate is still open; closing waits for threads
/// inside accept (non-blocking, so briefly), not for those in poll.
pub struct ApiGate {
    st: Mutex<GateState>,
    cv: Condvar,
}

struct GateState {
    open: bool,
    /// Closed for good: this process will not own the guest again.
    retired: bool,
    /// Threads inside accept(2).
    accepting: usize,
}

impl ApiGate {
    pub fn new(open: bool) -> Self {
        ApiGate {
            st: Mutex::new(GateState {
                open,
                retired: false,
                accepting: 0,
            }),
            cv: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lets the threads accept (unless retired).
    pub fn open(&self) {
        let mut st = self.lock();
        if !st.retired {
            st.open = true;
            self.cv.notify_all();
        }
    }

    /// Stops accepting: returns once no thread can accept another
    /// connection. Connections already accepted are served on.
    pub fn close(&self) {
        let mut st = self.lock();
        st.open = false;
        while st.accepting > 0 {
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Closes the gate for good: the guest belongs to another process.
    pub fn retire(&self) {
        self.close();
        self.lock().retired = true;
        self.cv.notify_all();
    }

    pub fn is_retired(&self) -> bool {
        self.lock().retired
    }

    /// Waits until the gate is open; false once it is retired.
    pub(crate) fn wait_open(&self) -> bool {
        let mut st = self.lock();
        loop {
            if st.retired {
                return false;
            }
            if st.open {
                return true;
            }
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Counts the caller in for one accept, if the gate is still open.
    pub(crate) fn begin_accept(&self) -> bool {
        let mut st = self.lock();
        if st.open {
            st.accepting += 1;
        }
        st.open
    }

    pub(crate) fn end_accept(&self) {
        let mut st = self.lock();
        st.accepting -= 1;
        self.cv.notify_all();
    }
}
