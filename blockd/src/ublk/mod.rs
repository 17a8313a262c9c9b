//! The ublk frontend: blockd serves images as `/dev/ublkbN` block devices itself, through
//! the kernel's ublk driver (`ublk_drv`, Linux ≥ 6.0) and the `libublk` crate.
//!
//! ```text
//!  file system ─▶ /dev/ublkbN ─▶ ublk_drv ══ io_uring (one ring per queue) ══▶ blockd
//!                                   queue thread ─▶ pool file (zero copy, same ring)
//!                                                ─▶ engine (blocking pool)
//! ```
//!
//! This module owns every ublk device blockd serves ([`UblkFrontend`]): which image each
//! one shows, its control thread (one per device, running libublk's `run_target`), and
//! its queue threads ([`queue`]).
//!
//! Invariants:
//! - **Who owns what.** Each device has one control thread (it adds or recovers the
//!   device and waits for it to stop) and one thread per hardware queue. A queue thread
//!   owns its io_uring and its tags; it hands each request to the tokio blocking pool,
//!   which runs the engine call (read, write, flush, discard, write-zeroes, with the
//!   volume's QoS and metrics), and commits the result on its own ring ([`queue`]).
//! - **Attachments are persistent.** Attaching records the device id in the image's
//!   metadata record *before* the device is created (blockd picks the id), so a crash at
//!   any point leaves a record that the next start acts on: it recovers the device if the
//!   kernel still has it, or creates it again with the same id (after a reboot), so the
//!   path stays `/dev/ublkbN`.
//! - **A restart loses no I/O.** Devices are created with `UBLK_F_USER_RECOVERY` and
//!   `UBLK_F_USER_RECOVERY_REISSUE`: when blockd dies (SIGKILL) or stops (SIGTERM) the
//!   kernel keeps the device and queues new I/O; requests blockd had received but not
//!   completed are reissued to the next blockd, which takes the device over at start
//!   (`START_USER_RECOVERY` … `END_USER_RECOVERY`, no command needed). On SIGTERM blockd
//!   first *freezes* the frontend (no result is committed any more, so nothing half-done
//!   is acknowledged), then flushes the engine: every acknowledged write and flush is
//!   durable, and what was in flight is reissued. After SIGKILL nothing acknowledged is
//!   lost either: a write is answered only once the chunk mappings it created are
//!   committed (overwrites in place need no commit: their data is in the pool file or on
//!   the device, which outlive the process). A power cut still loses what was not
//!   flushed, as with a disk's volatile cache.
//! - **blockd never deletes a device by accident.** The control handle is disowned at
//!   once (libublk would otherwise delete the device when it is dropped); only
//!   [`UblkFrontend::detach`] stops and deletes a device, and it refuses while the device
//!   is open (mounted).
//! - **Zero copy is chosen at run time.** When the driver can register request buffers
//!   automatically (`UBLK_F_AUTO_BUF_REG`, Linux 6.16+) new devices are created with it
//!   (unless `ublk-zero-copy = "off"`), and their queues move reads and in-place
//!   overwrites between the request's own pages and the pool file without a copy
//!   ([`queue`]); elsewhere the data path is "copy". A device keeps the data path it was
//!   created with (recovery cannot change a device's flags); `blockctl status` shows
//!   each device's. Zero copy through `UBLK_F_SUPPORT_ZERO_COPY` alone (6.15, explicit
//!   register commands per request) is not used: it costs two more commands per
//!   request for what 6.16 does by itself.
//! - **Online resize** uses `UBLK_U_CMD_UPDATE_SIZE` (`UBLK_F_UPDATE_SIZE`, Linux 6.16+).
//!   On older kernels the device keeps its size until it is detached and attached again,
//!   and blockd logs that.
//!
//! # The mount-namespace trap
//! A ublk server must not share its mount namespace with users of its own devices: if
//! the server ends up the last task of a namespace that holds a mount of its device, its
//! exit unmounts that file system, which waits for I/O only the exiting server could
//! serve, and the exit deadlocks. blockd avoids it by never mounting anything (csi-shim
//! mounts) and by running where no mount of its devices lives: the host's own namespace
//! under systemd (which outlives blockd), or its own container in the DaemonSet, which
//! mounts neither the kubelet directory nor any mount propagation (see
//! `deploy/kubernetes/daemonset.yaml`). csi-shim, which mounts, is a separate container.

mod queue;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::UblkDev;
use libublk::{sys, UblkFlags};
use parking_lot::Mutex;

use crate::engine::{Engine, EngineError};
use crate::metrics::Metrics;
use crate::qos::Limiter;

use self::queue::Serve;

/// The control device of the ublk driver.
const CONTROL: &str = "/dev/ublk-control";
/// Tags per queue.
const QUEUE_DEPTH: u16 = 64;
/// The largest request (and each tag's buffer).
const IO_BUF_BYTES: u32 = 512 << 10;
/// At most this many hardware queues per device.
const MAX_QUEUES: usize = 4;
/// How long attach waits for a device to come up.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Errors of the ublk frontend.
#[derive(Debug, thiserror::Error)]
pub enum UblkError {
    /// This kernel cannot serve ublk devices.
    #[error("ublk is not available on this machine: {reason}")]
    Unavailable { reason: String },
    /// The device is open (mounted, or held by a process).
    #[error("Cannot detach {image:?}: {device} is in use (mounted or open); unmount it first")]
    InUse { image: String, device: String },
    /// The kernel refused a control command, or the device did not come up.
    #[error("ublk device {device} for {image:?}: {what}")]
    Device {
        image: String,
        device: String,
        what: String,
    },
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// What the running kernel's ublk driver can do.
#[derive(Debug, Clone)]
pub enum Support {
    Unavailable(String),
    Available {
        /// The driver's feature bits (`UBLK_F_*`).
        features: u64,
    },
}

impl Support {
    /// Asks the driver (through `/dev/ublk-control`) what it supports.
    pub fn detect() -> Support {
        if !Path::new(CONTROL).exists() {
            return Support::Unavailable(format!(
                "no {CONTROL} (load the kernel module: `modprobe ublk_drv`, Linux 6.0 or later)"
            ));
        }
        match UblkCtrl::get_features() {
            Some(features) => Support::Available { features },
            None => Support::Unavailable(format!(
                "{CONTROL} does not answer UBLK_U_CMD_GET_FEATURES (the driver predates Linux 6.5, or blockd lacks CAP_SYS_ADMIN)"
            )),
        }
    }

    fn has(&self, bit: u64) -> bool {
        matches!(self, Support::Available { features } if features & bit != 0)
    }

    /// Whether the kernel registers request buffers by itself, which blockd's zero-copy
    /// data path needs.
    pub fn zero_copy_possible(&self) -> bool {
        self.has(sys::UBLK_F_AUTO_BUF_REG as u64)
    }

    /// The data path of devices created now, with zero copy `wanted` or not.
    pub fn data_path(&self, wanted: bool) -> &'static str {
        data_path(wanted && self.zero_copy_possible())
    }

    /// One line for `blockctl status` and the log.
    pub fn describe(&self, zero_copy_wanted: bool) -> String {
        match self {
            Support::Unavailable(reason) => format!("unavailable: {reason}"),
            Support::Available { .. } => {
                let recovery = if self.has(sys::UBLK_F_USER_RECOVERY_REISSUE as u64) {
                    "user recovery with reissue"
                } else if self.has(sys::UBLK_F_USER_RECOVERY as u64) {
                    "user recovery"
                } else {
                    "no user recovery"
                };
                let zc = if self.has(sys::UBLK_F_AUTO_BUF_REG as u64) {
                    if zero_copy_wanted {
                        "kernel offers auto buffer registration"
                    } else {
                        "kernel offers auto buffer registration, turned off by ublk-zero-copy"
                    }
                } else if self.has(sys::UBLK_F_SUPPORT_ZERO_COPY as u64) {
                    "kernel offers zero copy, not auto buffer registration"
                } else {
                    "kernel offers no zero copy"
                };
                let resize = if self.has(sys::UBLK_F_UPDATE_SIZE as u64) {
                    "online resize"
                } else {
                    "no online resize"
                };
                format!(
                    "available: {recovery}, {resize}, data path {} ({zc})",
                    self.data_path(zero_copy_wanted)
                )
            }
        }
    }
}

/// The name of a data path: see the module docs.
fn data_path(zero_copy: bool) -> &'static str {
    if zero_copy {
        "zero-copy"
    } else {
        "copy"
    }
}

/// A device as listings show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UblkDeviceInfo {
    pub image: String,
    pub dev_id: u32,
    pub device: String,
    pub read_only: bool,
    /// "live", "recovering", "starting" or "failed: <reason>".
    pub state: String,
    pub data_path: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum DevState {
    Starting,
    Recovering,
    Live,
    Failed(String),
}

impl DevState {
    fn describe(&self) -> String {
        match self {
            DevState::Starting => "starting".into(),
            DevState::Recovering => "recovering".into(),
            DevState::Live => "live".into(),
            DevState::Failed(why) => format!("failed: {why}"),
        }
    }
}

struct Device {
    image: String,
    dev_id: u32,
    read_only: bool,
    state: Mutex<DevState>,
    /// The control thread; it returns when the device has stopped.
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Whether the device serves with zero copy; known once it serves.
    zero_copy: AtomicBool,
}

impl Device {
    fn info(&self) -> UblkDeviceInfo {
        UblkDeviceInfo {
            image: self.image.clone(),
            dev_id: self.dev_id,
            device: bdev_path(self.dev_id),
            read_only: self.read_only,
            state: self.state.lock().describe(),
            data_path: data_path(self.zero_copy.load(Ordering::SeqCst)).to_string(),
        }
    }
}

fn bdev_path(id: u32) -> String {
    format!("/dev/ublkb{id}")
}

/// How a control thread brings its device up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// Create the device (with this id).
    Add,
    /// Take over a device a previous blockd served.
    Recover,
}

struct Inner {
    engine: Engine,
    metrics: Metrics,
    runtime: tokio::runtime::Handle,
    support: Support,
    /// Whether new devices use zero copy where the kernel offers it.
    zero_copy_wanted: bool,
    /// Image name → device.
    devices: Mutex<BTreeMap<String, Arc<Device>>>,
    /// Serialises attach and detach.
    ops: Mutex<()>,
    /// Set when blockd stops (see the module docs).
    frozen: Arc<AtomicBool>,
}

/// The ublk devices of this blockd. Cheap to clone; methods block (run them off the
/// async runtime's workers).
#[derive(Clone)]
pub struct UblkFrontend {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for UblkFrontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UblkFrontend")
            .field("support", &self.inner.support)
            .finish_non_exhaustive()
    }
}

impl UblkFrontend {
    /// A frontend for `engine`; detects what the kernel supports and logs it. New devices
    /// use zero copy where the kernel offers it if `zero_copy_wanted`.
    pub fn new(
        engine: Engine,
        metrics: Metrics,
        runtime: tokio::runtime::Handle,
        zero_copy_wanted: bool,
    ) -> Self {
        let support = Support::detect();
        match &support {
            Support::Unavailable(reason) => {
                tracing::info!(reason = %reason, "ublk frontend unavailable")
            }
            Support::Available { features } => tracing::info!(
                features = format_args!("{features:#x}"),
                zero_copy_possible = support.zero_copy_possible(),
                data_path = support.data_path(zero_copy_wanted),
                "ublk frontend ready: {}",
                support.describe(zero_copy_wanted)
            ),
        }
        UblkFrontend {
            inner: Arc::new(Inner {
                engine,
                metrics,
                runtime,
                support,
                zero_copy_wanted,
                devices: Mutex::new(BTreeMap::new()),
                ops: Mutex::new(()),
                frozen: Arc::new(AtomicBool::new(false)),
            }),
        }
    }

    pub fn support(&self) -> &Support {
        &self.inner.support
    }

    /// What the driver offers and the data path new devices get, in one line.
    pub fn describe(&self) -> String {
        self.inner.support.describe(self.inner.zero_copy_wanted)
    }

    fn check_available(&self) -> Result<(), UblkError> {
        match &self.inner.support {
            Support::Unavailable(reason) => Err(UblkError::Unavailable {
                reason: reason.clone(),
            }),
            Support::Available { .. } => Ok(()),
        }
    }

    /// The devices, sorted by image.
    pub fn list(&self) -> Vec<UblkDeviceInfo> {
        let devices = self.inner.devices.lock();
        devices.values().map(|d| d.info()).collect()
    }

    /// The device path of `image`, when attached.
    pub fn device_of(&self, image: &str) -> Option<String> {
        self.inner
            .devices
            .lock()
            .get(image)
            .map(|d| bdev_path(d.dev_id))
    }

    /// Stops committing results to the kernel (blockd is stopping): whatever is in
    /// flight is reissued to the next blockd.
    pub fn freeze(&self) {
        self.inner.frozen.store(true, Ordering::SeqCst);
        let n = self.inner.devices.lock().len();
        if n > 0 {
            tracing::info!(
                devices = n,
                "ublk devices left to the kernel; the next blockd recovers them"
            );
        }
    }

    /// Attaches `image` ("VOL" or "VOL@SNAP") as a ublk device; returns it and whether
    /// it was created now (false: it was attached already).
    pub fn attach(&self, image: &str) -> Result<(UblkDeviceInfo, bool), UblkError> {
        let _op = self.inner.ops.lock();
        if let Some(dev) = self.inner.devices.lock().get(image).cloned() {
            let failed = matches!(*dev.state.lock(), DevState::Failed(_));
            if !failed {
                return Ok((dev.info(), false));
            }
            // A device that failed: take it down and make it again.
            self.remove(&dev)?;
        }
        self.check_available()?;
        // NOT_FOUND before anything is created.
        self.inner.engine.open_image(image)?;
        let used: Vec<u32> = self
            .inner
            .engine
            .ublk_devices()
            .into_iter()
            .map(|(_, id)| id)
            .collect();
        let id = (0..u32::from(u16::MAX))
            .find(|id| !used.contains(id) && !kernel_has(*id))
            .ok_or_else(|| UblkError::Device {
                image: image.to_string(),
                device: "/dev/ublkb?".into(),
                what: "no free ublk device id".into(),
            })?;
        // Recorded first: a crash from here on leaves a record the next start acts on.
        self.inner.engine.set_ublk_device(image, Some(id))?;
        match self.start(image, id, Start::Add) {
            Ok(dev) => {
                tracing::info!(image, device = %bdev_path(id), "attached ublk device");
                Ok((dev.info(), true))
            }
            Err(e) => {
                let _ = self.inner.engine.set_ublk_device(image, None);
                Err(e)
            }
        }
    }

    /// Detaches `image`'s device; false when it had none. Refused while the device is
    /// open (a mounted file system).
    pub fn detach(&self, image: &str) -> Result<bool, UblkError> {
        let _op = self.inner.ops.lock();
        let dev = self.inner.devices.lock().get(image).cloned();
        let Some(dev) = dev else {
            // Not served, but maybe recorded (a failed recovery): forget the record.
            let recorded = self
                .inner
                .engine
                .ublk_devices()
                .into_iter()
                .find(|(i, _)| i == image);
            if let Some((_, id)) = recorded {
                if kernel_has(id) {
                    delete_device(id);
                }
                self.inner.engine.set_ublk_device(image, None)?;
                return Ok(true);
            }
            return Ok(false);
        };
        let device = bdev_path(dev.dev_id);
        if in_use(&device) {
            return Err(UblkError::InUse {
                image: image.to_string(),
                device,
            });
        }
        self.remove(&dev)?;
        tracing::info!(image, device = %device, "detached ublk device");
        Ok(true)
    }

    /// Stops and deletes a device, forgets it and its record.
    fn remove(&self, dev: &Arc<Device>) -> Result<(), UblkError> {
        if kernel_has(dev.dev_id) {
            match UblkCtrl::new_simple(dev.dev_id as i32) {
                Ok(ctrl) => {
                    let _ = ctrl.kill_dev();
                }
                Err(e) => {
                    tracing::warn!(device = %bdev_path(dev.dev_id), error = %e, "cannot open the ublk device to stop it")
                }
            }
        }
        if let Some(thread) = dev.thread.lock().take() {
            let _ = thread.join();
        }
        if kernel_has(dev.dev_id) {
            delete_device(dev.dev_id);
        }
        self.inner.devices.lock().remove(&dev.image);
        self.inner
            .metrics
            .forget_ublk_device(&dev.image, &bdev_path(dev.dev_id));
        match self.inner.engine.set_ublk_device(&dev.image, None) {
            Ok(_) | Err(EngineError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Recovers (or recreates) every recorded attachment, each on its own thread: I/O
    /// the kernel queued while blockd was down resumes as soon as its device is taken
    /// over. Called once at start.
    pub fn recover_all(&self) {
        let recorded = self.inner.engine.ublk_devices();
        if recorded.is_empty() {
            return;
        }
        if let Err(e) = self.check_available() {
            tracing::error!(devices = recorded.len(), error = %e, "cannot recover the recorded ublk devices");
            let mut devices = self.inner.devices.lock();
            for (image, id) in recorded {
                let read_only = image.contains('@');
                devices.insert(
                    image.clone(),
                    Arc::new(Device {
                        image,
                        dev_id: id,
                        read_only,
                        state: Mutex::new(DevState::Failed(e.to_string())),
                        thread: Mutex::new(None),
                        zero_copy: AtomicBool::new(false),
                    }),
                );
            }
            return;
        }
        for (image, id) in recorded {
            let this = self.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("ublk-recover-{id}"))
                .spawn(move || {
                    let mode = match kernel_state(id) {
                        Some(state) if state == sys::UBLK_S_DEV_DEAD as u16 => {
                            // Added but never started, or stopped: make it anew.
                            delete_device(id);
                            Start::Add
                        }
                        Some(_) => Start::Recover,
                        None => Start::Add,
                    };
                    match this.start(&image, id, mode) {
                        Ok(_) => tracing::info!(
                            image = %image,
                            device = %bdev_path(id),
                            recovered = mode == Start::Recover,
                            "ublk device {}",
                            if mode == Start::Recover { "recovered" } else { "created again" }
                        ),
                        Err(e) => tracing::error!(image = %image, device = %bdev_path(id), error = %e, "cannot recover the ublk device; `blockctl detach` removes it, `blockctl attach` retries"),
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a ublk recovery thread");
            }
        }
    }

    /// Makes the devices of volume `volume` follow its (new) size, where the kernel can.
    pub fn resized(&self, volume: &str, size: u64) {
        let Some(dev) = self.inner.devices.lock().get(volume).cloned() else {
            return;
        };
        let device = bdev_path(dev.dev_id);
        if !self.inner.support.has(sys::UBLK_F_UPDATE_SIZE as u64) {
            tracing::warn!(volume, device = %device, size_bytes = size, "this kernel cannot resize a live ublk device (UBLK_F_UPDATE_SIZE, Linux 6.16+): the device keeps its size until it is detached and attached again");
            return;
        }
        let result = UblkCtrl::new_simple(dev.dev_id as i32).and_then(|c| c.update_size(size));
        match result {
            Ok(_) => {
                tracing::info!(volume, device = %device, size_bytes = size, "resized ublk device")
            }
            Err(e) => {
                tracing::warn!(volume, device = %device, error = %e, "cannot resize the ublk device")
            }
        }
    }

    /// Brings device `id` up for `image` on a new control thread and waits until it
    /// serves I/O.
    fn start(&self, image: &str, id: u32, mode: Start) -> Result<Arc<Device>, UblkError> {
        let err = |what: String| UblkError::Device {
            image: image.to_string(),
            device: bdev_path(id),
            what,
        };
        let handle = match self.inner.engine.open_image(image) {
            Ok(h) => h,
            Err(e @ EngineError::NotFound { .. }) if mode == Start::Recover => {
                // The image went away while attached (deleted with --force while blockd
                // was down): the device has nothing to show.
                delete_device(id);
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        };
        let size = self.inner.engine.image_size(&handle)?;
        let read_only = handle.read_only();
        let dev = Arc::new(Device {
            image: image.to_string(),
            dev_id: id,
            read_only,
            state: Mutex::new(match mode {
                Start::Add => DevState::Starting,
                Start::Recover => DevState::Recovering,
            }),
            thread: Mutex::new(None),
            zero_copy: AtomicBool::new(false),
        });
        self.inner
            .devices
            .lock()
            .insert(image.to_string(), dev.clone());
        let serve = Arc::new(Serve {
            io: self.inner.metrics.image_io(image),
            engine: self.inner.engine.clone(),
            handle,
            limiter: Limiter::new(),
            frozen: self.inner.frozen.clone(),
            runtime: self.inner.runtime.clone(),
        });
        let flags = self.ctrl_flags();
        let (tx, rx) = std::sync::mpsc::channel::<Result<bool, String>>();
        let thread_dev = dev.clone();
        let metrics = self.inner.metrics.clone();
        let thread = std::thread::Builder::new()
            .name(format!("ublk-{id}"))
            .spawn(move || {
                let started = tx.clone();
                let result = run_device(id, mode, size, read_only, flags, serve, move |zc| {
                    let _ = started.send(Ok(zc));
                });
                let why = match result {
                    Ok(()) => "the device stopped".to_string(),
                    Err(e) => e,
                };
                // Before start: attach reports it; after: the device is gone or dead.
                let _ = tx.send(Err(why.clone()));
                *thread_dev.state.lock() = DevState::Failed(why);
                metrics.set_ublk_device(&thread_dev.image, &bdev_path(id), false);
            })
            .map_err(|e| err(format!("cannot start its control thread: {e}")))?;
        *dev.thread.lock() = Some(thread);
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(Ok(zero_copy)) => {
                dev.zero_copy.store(zero_copy, Ordering::SeqCst);
                tracing::info!(image, device = %bdev_path(id), data_path = data_path(zero_copy), "ublk device serving");
                *dev.state.lock() = DevState::Live;
                self.inner
                    .metrics
                    .set_ublk_device(image, &bdev_path(id), true);
                Ok(dev)
            }
            Ok(Err(why)) => {
                if let Some(t) = dev.thread.lock().take() {
                    let _ = t.join();
                }
                self.inner.devices.lock().remove(image);
                if mode == Start::Add && kernel_has(id) {
                    delete_device(id);
                }
                Err(err(why))
            }
            Err(_) => {
                *dev.state.lock() = DevState::Failed("did not start in time".into());
                Err(err(format!(
                    "did not start within {} s",
                    START_TIMEOUT.as_secs()
                )))
            }
        }
    }

    /// The device flags blockd asks for, limited to what the driver has.
    fn ctrl_flags(&self) -> u64 {
        let wanted = (sys::UBLK_F_USER_RECOVERY
            | sys::UBLK_F_USER_RECOVERY_REISSUE
            | sys::UBLK_F_CMD_IOCTL_ENCODE
            | sys::UBLK_F_UPDATE_SIZE
            | if self.inner.zero_copy_wanted {
                sys::UBLK_F_AUTO_BUF_REG
            } else {
                0
            }) as u64;
        match self.inner.support {
            Support::Available { features } => wanted & features,
            Support::Unavailable(_) => 0,
        }
    }
}

/// The control thread of one device: adds (or recovers) it, serves it until it stops.
/// `started` runs once the device serves I/O, told whether it serves with zero copy.
/// Errors are one line.
fn run_device(
    id: u32,
    mode: Start,
    size: u64,
    read_only: bool,
    flags: u64,
    serve: Arc<Serve>,
    started: impl FnOnce(bool) + Send + Sync + 'static,
) -> Result<(), String> {
    if mode == Start::Recover {
        let ctrl = UblkCtrl::new_simple(id as i32).map_err(|e| format!("cannot open it: {e}"))?;
        ctrl.start_user_recover()
            .map_err(|e| format!("START_USER_RECOVERY failed: {e}"))?;
    }
    let queues = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, MAX_QUEUES) as u16;
    let ctrl = UblkCtrlBuilder::default()
        .name("blockd")
        .id(id as i32)
        .nr_queues(queues)
        .depth(QUEUE_DEPTH)
        .io_buf_bytes(IO_BUF_BYTES)
        .ctrl_flags(flags)
        .dev_flags(match mode {
            Start::Add => UblkFlags::UBLK_DEV_F_ADD_DEV,
            Start::Recover => UblkFlags::UBLK_DEV_F_RECOVER_DEV,
        })
        .build()
        .map_err(|e| {
            format!(
                "cannot {} it: {e}",
                if mode == Start::Add { "add" } else { "open" }
            )
        })?;
    // Never deleted by a drop: only detach deletes (module docs).
    ctrl.disown();
    let tgt_init = move |dev: &mut UblkDev| {
        set_params(dev, size, read_only);
        Ok::<(), libublk::UblkError>(())
    };
    let q_fn = move |qid: u16, dev: &UblkDev| queue::serve_queue(qid, dev, serve.clone());
    let result = ctrl.run_target(tgt_init, q_fn, move |ctrl: &UblkCtrl| {
        started(ctrl.dev_info().flags & sys::UBLK_F_AUTO_BUF_REG as u64 != 0);
    });
    result
        .map(|_| ())
        .map_err(|e| format!("the device failed: {e}"))
}

/// The device's limits and attributes: 512-byte logical blocks (any 4 KiB-aligned
/// volume size fits), 4 KiB physical, a volatile cache with FUA (the engine's flush is
/// the commit), discard and write-zeroes unless read-only.
fn set_params(dev: &mut UblkDev, size: u64, read_only: bool) {
    let depth = dev.dev_info.queue_depth;
    let max_sectors = dev.dev_info.max_io_buf_bytes >> 9;
    // Room in the ring for the wake-up read beside every tag's command, and with zero
    // copy for the pool-file transfers of every tag (a request spanning chunks and holes
    // takes several).
    let per_tag = if dev.dev_info.flags & sys::UBLK_F_AUTO_BUF_REG as u64 != 0 {
        8
    } else {
        2
    };
    let tgt = &mut dev.tgt;
    tgt.dev_size = size;
    tgt.sq_depth = depth.saturating_mul(per_tag);
    tgt.cq_depth = depth.saturating_mul(per_tag);
    let mut attrs = sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA;
    let mut types = sys::UBLK_PARAM_TYPE_BASIC;
    if read_only {
        attrs |= sys::UBLK_ATTR_READ_ONLY;
    } else {
        types |= sys::UBLK_PARAM_TYPE_DISCARD;
    }
    tgt.params = sys::ublk_params {
        types,
        basic: sys::ublk_param_basic {
            attrs,
            logical_bs_shift: 9,
            physical_bs_shift: 12,
            io_opt_shift: 12,
            io_min_shift: 12,
            max_sectors,
            dev_sectors: size >> 9,
            ..Default::default()
        },
        discard: sys::ublk_param_discard {
            discard_alignment: 0,
            discard_granularity: 4096,
            max_discard_sectors: u32::MAX >> 9,
            max_write_zeroes_sectors: u32::MAX >> 9,
            max_discard_segments: 1,
            ..Default::default()
        },
        ..Default::default()
    };
}

/// Whether the kernel has ublk device `id` (its char device exists).
fn kernel_has(id: u32) -> bool {
    Path::new(&format!("/sys/class/ublk-char/ublkc{id}")).exists()
        || Path::new(&format!("/dev/ublkc{id}")).exists()
}

/// The kernel's state of device `id` (`UBLK_S_DEV_*`), None when it has no such device.
fn kernel_state(id: u32) -> Option<u16> {
    if !kernel_has(id) {
        return None;
    }
    UblkCtrl::new_simple(id as i32)
        .ok()
        .map(|c| c.dev_info().state)
}

/// Deletes device `id` (stopping it first); logs failures.
fn delete_device(id: u32) {
    match UblkCtrl::new_simple(id as i32) {
        Ok(ctrl) => {
            let _ = ctrl.kill_dev();
            if let Err(e) = ctrl.del_dev() {
                tracing::warn!(device = %bdev_path(id), error = %e, "cannot delete the ublk device");
            }
        }
        Err(e) => {
            tracing::warn!(device = %bdev_path(id), error = %e, "cannot open the ublk device to delete it")
        }
    }
}

/// Whether a block device is open by someone else (a mount holds it exclusively).
fn in_use(device: &str) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(device)
    {
        Ok(_) => false,
        Err(e) => e.raw_os_error() == Some(libc::EBUSY),
    }
}
