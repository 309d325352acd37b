//! What a `no_std` binary without a C library needs on this target: the
//! panic handler, `rust_eh_personality` (the prebuilt `core` still refers
//! to it under `panic = "abort"`), and the memory functions the compiler
//! calls.

use core::panic::PanicInfo;

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    crate::println!("guest panic: {info}");
    crate::exit(101)
}

/// Never called: guests abort on panic.
#[unsafe(no_mangle)]
extern "C" fn rust_eh_personality() {}

// The compiler lowers copies and fills to these; written with string
// instructions so that no loop can be turned back into a call to itself.

/// # Safety
/// As C's `memcpy`.
#[unsafe(no_mangle)]
unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller's contract: `n` valid, non-overlapping bytes.
    unsafe {
        core::arch::asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _, options(nostack, preserves_flags))
    };
    dst
}

/// # Safety
/// As C's `memmove`.
#[unsafe(no_mangle)]
unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize).wrapping_add(n) {
        // SAFETY: copying forwards never overwrites bytes still to be read.
        return unsafe { memcpy(dst, src, n) };
    }
    // SAFETY: the caller's contract; backwards with the direction flag,
    // cleared again before returning (the ABI wants it clear).
    unsafe {
        core::arch::asm!(
            "std",
            "rep movsb",
            "cld",
            inout("rcx") n => _,
            inout("rdi") dst.add(n - 1) => _,
            inout("rsi") src.add(n - 1) => _,
            options(nostack),
        )
    };
    dst
}

/// # Safety
/// As C's `memset`.
#[unsafe(no_mangle)]
unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller's contract: `n` valid bytes.
    unsafe {
        core::arch::asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") c as u8, options(nostack, preserves_flags))
    };
    dst
}

/// # Safety
/// As C's `memcmp`.
#[unsafe(no_mangle)]
unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: the caller's contract: `n` valid bytes at both.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
    }
    0
}

/// # Safety
/// As `bcmp`.
#[unsafe(no_mangle)]
unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: as memcmp.
    unsafe { memcmp(a, b, n) }
}

/// The heap: a bump allocator over a static arena. Freed memory is not
/// reused; guests are short programs (the drivers allocate a few buffers).
mod heap {
    use core::alloc::{GlobalAlloc, Layout};
    use core::cell::UnsafeCell;
    use core::sync::atomic::{AtomicUsize, Ordering};

    const ARENA: usize = 1 << 20;

    #[repr(align(4096))]
    struct Arena(UnsafeCell<[u8; ARENA]>);

    // SAFETY: the arena is handed out in disjoint pieces by an atomic bump.
    unsafe impl Sync for Arena {}

    static MEMORY: Arena = Arena(UnsafeCell::new([0; ARENA]));
    static NEXT: AtomicUsize = AtomicUsize::new(0);

    struct Bump;

    // SAFETY: every allocation is a distinct, suitably aligned piece of the
    // arena, never handed out twice; null when the arena is exhausted.
    unsafe impl GlobalAlloc for Bump {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let base = MEMORY.0.get() as usize;
            let mut cur = NEXT.load(Ordering::Relaxed);
            loop {
                let start = (base + cur).next_multiple_of(layout.align()) - base;
                let Some(end) = start.checked_add(layout.size()).filter(|&e| e <= ARENA) else {
                    return core::ptr::null_mut();
                };
                match NEXT.compare_exchange(cur, end, Ordering::Relaxed, Ordering::Relaxed) {
                    Ok(_) => return (base + start) as *mut u8,
                    Err(now) => cur = now,
                }
            }
        }

        unsafe fn dealloc(&self, _ptr: *mut u8, _layout: Layout) {}
    }

    #[global_allocator]
    static HEAP: Bump = Bump;
}
