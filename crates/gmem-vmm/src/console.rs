//! Where the guest's console output goes.

use std::io::Write;
use std::sync::{Arc, Mutex};

/// The most bytes one shared-buffer console request may print.
pub const MAX_CONSOLE_BYTES: u64 = 64 << 10;

/// Where the guest's console output goes: shared by every vCPU, each write
/// whole.
#[derive(Clone)]
pub struct Console(Arc<Mutex<Box<dyn Write + Send>>>);

impl Console {
    /// The process's standard output.
    pub fn stdout() -> Console {
        Console(Arc::new(Mutex::new(Box::new(std::io::stdout()))))
    }

    /// The process's standard error.
    pub fn stderr() -> Console {
        Console(Arc::new(Mutex::new(Box::new(std::io::stderr()))))
    }

    /// An in-memory console, and the buffer it fills.
    pub fn buffer() -> (Console, Arc<Mutex<Vec<u8>>>) {
        let buf = Arc::new(Mutex::new(Vec::new()));
        (
            Console(Arc::new(Mutex::new(Box::new(BufWriter(Arc::clone(&buf)))))),
            buf,
        )
    }

    pub(crate) fn write(&self, bytes: &[u8]) {
        let mut out = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // Console output is best effort: a closed stdout must not kill the VM.
        let _ = out.write_all(bytes);
        let _ = out.flush();
    }
}

struct BufWriter(Arc<Mutex<Vec<u8>>>);

impl Write for BufWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
