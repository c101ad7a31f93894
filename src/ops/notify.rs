//! systemd's readiness protocol (`Type=notify`): datagrams to `$NOTIFY_SOCKET`. Without that
//! variable (not under systemd) every call does nothing.

use std::os::unix::net::UnixDatagram;

/// Send one notification (`READY=1`, `STOPPING=1`, ...). Errors are ignored: systemd may be
/// gone, and the peer serves either way.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return;
    };
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    if let Some(name) = bytes.strip_prefix(b"@") {
        // An abstract socket (Linux).
        use std::os::linux::net::SocketAddrExt;
        if let Ok(addr) = std::os::unix::net::SocketAddr::from_abstract_name(name) {
            let _ = sock.send_to_addr(state.as_bytes(), &addr);
        }
    } else {
        let _ = sock.send_to(state.as_bytes(), &path);
    }
}

/// `RELOADING=1` with the `CLOCK_MONOTONIC` timestamp systemd orders reloads by.
pub fn reloading() {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    let ok = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } == 0;
    let usec = if ok {
        ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
    } else {
        0
    };
    notify(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
}
