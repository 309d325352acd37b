//! A guest's lines: to virtio-console when the machine has one, else to
//! the serial port (what the demos print their results with).

use core::fmt::Write;

use virtio_drivers::device::console::VirtIOConsole;
use virtio_drivers::transport::mmio::MmioTransport;

use crate::virtio::GmemHal;

/// A virtio-console over the SDK's bounce pool, if the machine has one.
pub type Console = Option<VirtIOConsole<GmemHal, MmioTransport<'static>>>;

/// One line, built on the stack (longer lines are cut at 256 bytes).
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Write for Line {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// Writes one line (`args` and a newline) to `console`, or to the serial
/// port without one (or if the console refuses it, saying so there).
pub fn say(console: &mut Console, args: core::fmt::Arguments<'_>) {
    let mut line = Line {
        buf: [0; 256],
        len: 0,
    };
    let _ = line.write_fmt(args);
    let _ = line.write_str("\n");
    match console {
        Some(c) => {
            if c.send_bytes(&line.buf[..line.len]).is_err() {
                crate::println!("virtio-console refused a line");
            }
        }
        None => crate::print!(
            "{}",
            core::str::from_utf8(&line.buf[..line.len]).unwrap_or("?")
        ),
    }
}
