//! Socket options on raw descriptors that std's socket types do not cover (netlink and
//! seqpacket sockets).

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

/// Sets `SO_RCVTIMEO` on `socket`: a receive fails after waiting `timeout` (whole seconds).
pub fn set_receive_timeout(socket: impl AsFd, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    // SAFETY: setsockopt(2) on a live descriptor, reading a timeval that outlives the call,
    // of the size given.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
