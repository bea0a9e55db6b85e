//! The 16550 UART at 0x3f8 (vm-superio), writing to stdout or a file, its
//! interrupt (IRQ 4) raised through an irqfd. Output is unbuffered: each byte
//! the guest writes reaches the host at once (boot timing reads the first).

use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState as SuperioState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;
use crate::persist::{Format10PartVersion, Persist};
use common::ratelimit::WarnLimiter;

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

#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("cannot duplicate the interrupt eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("invalid state: {0}")]
    State(String),
}

/// Migratable register state of the UART.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialState {
    /// Written by format 1.0, ignored ([`Format10PartVersion`]).
    #[serde(rename = "version", default, skip_serializing)]
    pub format_1_0_version: Format10PartVersion,
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

impl SerialDevice {
    pub fn new(irq: EventFd, out: Output) -> Self {
        SerialDevice {
            uart: Serial::new(IrqTrigger(irq), out),
            write_errors: WarnLimiter::default(),
        }
    }
}

impl Persist for SerialDevice {
    type State = SerialState;
    type Context<'a> = ();
    type Error = SerialError;

    fn save(&self, _: ()) -> Result<SerialState, SerialError> {
        let s = self.uart.state();
        Ok(SerialState {
            format_1_0_version: Format10PartVersion,
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
        })
    }

    /// Loads saved registers, keeping this device's irqfd and output.
    fn restore(&mut self, _: (), s: &SerialState) -> Result<(), SerialError> {
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
        let irq = self.uart.interrupt_evt().0.try_clone();
        let irq = irq.map_err(SerialError::EventFd)?;
        let sink: Output = Box::new(std::io::sink());
        let mut uart = Serial::from_state(&state, IrqTrigger(irq), NoEvents, sink)
            .map_err(|e| SerialError::State(format!("{e:?}")))?;
        // The output stays; a refused state left this device as it was.
        std::mem::swap(uart.writer_mut(), self.uart.writer_mut());
        self.uart = uart;
        Ok(())
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
            common::warn_limited!(self.write_errors, "serial write failed: {e:?}");
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
        let state = s.save(()).unwrap();
        let text = ron::to_string(&state).unwrap();
        let back: SerialState = ron::from_str(&text).unwrap();
        assert_eq!(back, state);
        // Into a fresh device: registers from the state, output its own.
        let out2 = Arc::new(Mutex::new(Vec::new()));
        let mut r = SerialDevice::new(EventFd::new(0).unwrap(), Box::new(Sink(out2.clone())));
        r.restore((), &back).unwrap();
        assert_eq!(r.save(()).unwrap(), state);
        r.write(0, b"i");
        assert_eq!(&*out2.lock().unwrap(), b"i");
        // A state the UART refuses (an input FIFO over 64 bytes) changes
        // nothing.
        let mut bad = back.clone();
        bad.scratch = 0x11;
        bad.in_buffer = vec![0; 65];
        assert!(matches!(r.restore((), &bad), Err(SerialError::State(_))));
        r.write(0, b"j");
        assert_eq!(&*out2.lock().unwrap(), b"ij");
        let mut v = [0u8];
        r.read(7, &mut v);
        assert_eq!(v[0], 0x5a);
    }
}
