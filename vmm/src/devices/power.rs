//! Power-off paths a guest can take: QEMU's isa-debug-exit port (0x501, any
//! write) and the i8042 reset command (0xFE to port 0x64). Either ends the VM
//! cleanly; vmm then exits 0.

use super::bus::BusDevice;
use crate::vm::{ExitReason, ExitSender};

pub const DEBUG_EXIT_PORT: u64 = 0x501;
pub const I8042_PORT: u64 = 0x60;
/// 0x60..0x65 covers the data (0x60) and command/status (0x64) ports.
pub const I8042_PORT_LEN: u64 = 5;
/// Offset of the command port (0x64) in the controller's range.
pub const I8042_COMMAND: u64 = 4;
/// The reset command (the FADT's RESET_VALUE).
pub const I8042_RESET: u8 = 0xfe;

/// isa-debug-exit: any write powers off.
pub struct DebugExit {
    exit: ExitSender,
}

impl DebugExit {
    pub fn new(exit: ExitSender) -> Self {
        DebugExit { exit }
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write(&mut self, _offset: u64, data: &[u8]) {
        let code = data.first().copied().unwrap_or(0);
        self.exit.send(ExitReason::PowerOff { code });
    }
}

/// Just enough of the i8042 controller for the reset command; reads report
/// an empty controller so a guest probing it does not spin.
pub struct I8042 {
    exit: ExitSender,
}

impl I8042 {
    pub fn new(exit: ExitSender) -> Self {
        I8042 { exit }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == I8042_COMMAND && data.first() == Some(&I8042_RESET) {
            self.exit.send(ExitReason::Reset);
        }
    }
}
