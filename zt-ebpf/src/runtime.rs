//! What every BPF object of this crate needs besides its programs: the panic
//! handler `no_std` demands (the verifier rejects any path that could reach
//! it, so it never runs) and the license section the kernel reads. The
//! other binaries include this file with `#[path]`.

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
