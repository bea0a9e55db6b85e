//! The 16550 UART at 0x3f8 (vm-superio), writing to stdout or a file, its
//! interrupt (IRQ 4) raised through an irqfd. Output is unbuffered: each byte
//! the guest writes reaches the host at once (boot timing reads the first).

use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState as SuperioState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;
use crate::ratelimit::WarnLimiter;

pub const SERIAL_PORT: u64 = 0x3f8;
pub const SERIAL_PORT_LEN: u64 = 8;
pub const SERIAL_IRQ: u32 = 4;

/// Raises the serial IRQ by writing the irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

pub type Output = Box<dyn Write + Send>;

pub struct SerialDevice {
    uart: Serial<IrqTrigger, NoEvents, Output>,
    /// The guest can make every byte fail (`--serial /dev/full`).
    write_errors: WarnLimiter,
}

/// Migratable register state of the UART.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    pub version: u32,
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

pub const SERIAL_STATE_VERSION: u32 = 1;

impl SerialDevice {
    pub fn new(irq: EventFd, out: Output) -> Self {
        SerialDevice {
            uart: Serial::new(IrqTrigger(irq), out),
            write_errors: WarnLimiter::default(),
        }
    }

    pub fn save(&self) -> SerialState {
        let s = self.uart.state();
        SerialState {
            version: SERIAL_STATE_VERSION,
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Loads saved registers into this device, keeping its irqfd and output.
    pub fn restore_registers(&mut self, s: &SerialState) -> Result<(), String> {
        let placeholder = Serial::new(
            IrqTrigger(EventFd::new(0).map_err(|e| e.to_string())?),
            Box::new(std::io::sink()) as Output,
        );
        let old = std::mem::replace(&mut self.uart, placeholder);
        let irq = EventFd::try_clone(&old.interrupt_evt().0).map_err(|e| e.to_string())?;
        let out = old.into_writer();
        *self = SerialDevice::restore(irq, out, s)?;
        Ok(())
    }

    pub fn restore(irq: EventFd, out: Output, s: &SerialState) -> Result<Self, String> {
        if s.version != SERIAL_STATE_VERSION {
            return Err(format!("unsupported serial state version {}", s.version));
        }
        let state = SuperioState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        };
        let uart = Serial::from_state(&state, IrqTrigger(irq), NoEvents, out)
            .map_err(|e| format!("invalid serial state: {e:?}"))?;
        Ok(SerialDevice {
            uart,
            write_errors: WarnLimiter::default(),
        })
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = u8::try_from(offset)
            .map(|o| self.uart.read(o))
            .unwrap_or(0xff);
        data.fill(v);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(offset), Some(&v)) = (u8::try_from(offset), data.first()) else {
            return;
        };
        if let Err(e) = self.uart.write(offset, v) {
            crate::warn_limited!(self.write_errors, "serial write failed: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_and_state_round_trip() {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let irq = EventFd::new(0).unwrap();
        let mut s = SerialDevice::new(irq.try_clone().unwrap(), Box::new(Sink(buf.clone())));
        s.write(7, &[0x5a]); // scratch register
        s.write(1, &[0x02]); // enable THR-empty interrupt
        s.write(0, b"h");
        assert_eq!(&*buf.lock().unwrap(), b"h");
        assert!(irq.read().unwrap() >= 1);
        let state = s.save();
        let text = ron::to_string(&state).unwrap();
        let back: SerialState = ron::from_str(&text).unwrap();
        assert_eq!(back, state);
        let mut r =
            SerialDevice::restore(EventFd::new(0).unwrap(), Box::new(std::io::sink()), &back)
                .unwrap();
        let mut v = [0u8];
        r.read(7, &mut v);
        assert_eq!(v[0], 0x5a);
    }
}
