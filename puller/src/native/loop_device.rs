//! A read-only loop device over an image file, for kernels whose EROFS mounts
//! only block devices (before 6.12). Set to clear itself: the kernel detaches
//! it when its last user (the mount, or our descriptor before the mount)
//! lets go, so nothing is left to clean up.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

// linux/loop.h: an ABI that has not changed since 2.6.
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_SET_FD: libc::c_ulong = 0x4C00;
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_SET_STATUS64: libc::c_ulong = 0x4C04;
const LO_FLAGS_AUTOCLEAR: u32 = 4;

/// `struct loop_info64`.
#[repr(C)]
struct LoopInfo64 {
    device: u64,
    inode: u64,
    rdevice: u64,
    offset: u64,
    sizelimit: u64,
    number: u32,
    encrypt_type: u32,
    encrypt_key_size: u32,
    flags: u32,
    file_name: [u8; 64],
    crypt_name: [u8; 64],
    encrypt_key: [u8; 32],
    init: [u64; 2],
}

/// A loop device attached to an image; the device goes once this and every
/// mount of it are gone.
pub struct LoopDevice {
    path: PathBuf,
    _device: File,
}

impl LoopDevice {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Attaches `image` (opened read-only, so the device is read-only) to a free
/// loop device.
pub fn attach(image: &Path) -> io::Result<LoopDevice> {
    let backing = File::open(image)?;
    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")?;
    // Another process can take the device between GET_FREE and SET_FD: ask
    // again then.
    for _ in 0..16 {
        // SAFETY: an ioctl without arguments on an open descriptor.
        let n = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let path = PathBuf::from(format!("/dev/loop{n}"));
        let device = OpenOptions::new().read(true).open(&path)?;
        // SAFETY: LOOP_SET_FD takes a descriptor number as its argument.
        let r = unsafe {
            libc::ioctl(
                device.as_raw_fd(),
                LOOP_SET_FD,
                backing.as_raw_fd() as libc::c_ulong,
            )
        };
        if r != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EBUSY) {
                continue;
            }
            return Err(e);
        }
        let mut info: LoopInfo64 = LoopInfo64 {
            device: 0,
            inode: 0,
            rdevice: 0,
            offset: 0,
            sizelimit: 0,
            number: 0,
            encrypt_type: 0,
            encrypt_key_size: 0,
            flags: LO_FLAGS_AUTOCLEAR,
            file_name: [0; 64],
            crypt_name: [0; 64],
            encrypt_key: [0; 32],
            init: [0; 2],
        };
        let name = image.as_os_str().as_encoded_bytes();
        let n = name.len().min(info.file_name.len() - 1);
        info.file_name[..n].copy_from_slice(&name[..n]);
        // SAFETY: LOOP_SET_STATUS64 reads a `struct loop_info64`, which
        // `info` is laid out as, for the duration of the call.
        let r = unsafe { libc::ioctl(device.as_raw_fd(), LOOP_SET_STATUS64, &info) };
        if r != 0 {
            let e = io::Error::last_os_error();
            // SAFETY: an ioctl without arguments on an open descriptor.
            unsafe { libc::ioctl(device.as_raw_fd(), LOOP_CLR_FD) };
            return Err(e);
        }
        return Ok(LoopDevice {
            path,
            _device: device,
        });
    }
    Err(io::Error::new(
        io::ErrorKind::ResourceBusy,
        "every free loop device was taken before it could be attached",
    ))
}
