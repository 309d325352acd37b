//! `print!` and `println!` to the serial port (the VMM writes a line at a
//! time).

use core::fmt;

use crate::{abi, io};

/// The serial console.
pub struct Serial;

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            // SAFETY: byte writes to the ABI's serial port.
            unsafe { io::outb(abi::PORT_SERIAL, b) };
        }
        Ok(())
    }
}

/// Nothing is buffered in the guest; the VMM flushes partial lines itself.
pub fn flush() {}

/// Prints to the serial console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {{
        let _ = core::fmt::Write::write_fmt(&mut $crate::console::Serial, format_args!($($arg)*));
    }};
}

/// Prints a line to the serial console.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => {{
        $crate::print!($($arg)*);
        $crate::print!("\n");
    }};
}
