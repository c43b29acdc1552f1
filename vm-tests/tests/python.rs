//! A Python module opened through a lazy mount has the modules it imports
//! fetched before anyone reads them: in its own layer and in the layer below
//! it, and theirs in turn, and the libraries its extension modules need
//! (see `sluice_puller::python`, `sluice_puller::elf`).
//!
//! Built on the Debian python3 rootfs fixture, which is not packed into
//! `cargo xtask vm-test` guests: the tests' names end in `python3_rootfs`,
//! which the guests skip; they run natively in `cargo test`.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{mount_layer, Fixture, Mounted};
use sluice_format::chunked::ChunkingOptions;
use sluice_format::layout::{Compression, ImageSpec};
use sluice_puller::fs::FsOptions;
use sluice_puller::image::StartCommand;
use sluice_puller::registry::RetryPolicy;
use sluice_puller::{ChunkCache, LayerOptions, RegistryClient};

const SITE: &str = "usr/lib/python3/dist-packages";
const STDLIB: &str = "usr/lib/python3.11";

/// Debian's python3 root filesystem as the base layer, and on top a package
/// `app` that is the standard library's `json` under another name (its
/// `.pyc` files copied): `app/__init__` imports `.decoder`, `.encoder` (this
/// layer) and `codecs` (the base); `decoder` imports `re`, `json` and the
/// extension module `_json` (the base). The top layer also has a script
/// `usr/local/bin/start` (`#!/usr/bin/env python3`, `import app`).
fn two_layer_fixture() -> Fixture {
    let rootfs = sluice_testkit::fixture("python3").join("rootfs");
    let dir = tempfile::tempdir().unwrap();
    let top = dir.path().join("top");
    let json = rootfs.join(STDLIB).join("json");
    let app = top.join(SITE).join("app");
    std::fs::create_dir_all(app.join("__pycache__")).unwrap();
    for m in ["__init__", "decoder", "encoder", "scanner"] {
        std::fs::copy(json.join(format!("{m}.py")), app.join(format!("{m}.py"))).unwrap();
        let pyc = format!("__pycache__/{m}.cpython-311.pyc");
        std::fs::copy(json.join(&pyc), app.join(&pyc)).unwrap();
    }
    let bin = top.join("usr/local/bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::write(
        bin.join("start"),
        "#!/usr/bin/env python3\nimport app\nprint('ready')\n",
    )
    .unwrap();
    let layout = dir.path().join("layout");
    sluice_format::layout::build_image(
        &layout,
        &ImageSpec {
            layers: vec![rootfs.clone(), top.clone()],
            compression: Compression::None,
            cmd: vec![],
            env: vec![],
            tag: "v1".into(),
        },
    )
    .unwrap();
    common::publish(
        dir,
        &layout,
        "py/app",
        &ChunkingOptions::default(),
        vec![rootfs, top],
    )
}

/// Both layers mounted over one fresh cache, the top one told the base is
/// below it.
fn mount_both(f: &Fixture, rt: &tokio::runtime::Runtime, fs: &FsOptions) -> (Mounted, Mounted) {
    let cache = Arc::new(
        ChunkCache::open(
            f.dir
                .path()
                .join(format!("cache-{}", common::rand_suffix())),
            1 << 30,
        )
        .unwrap(),
    );
    let client = Arc::new(RegistryClient::new(RetryPolicy::default()));
    let mount = |which| {
        mount_layer(
            rt,
            f,
            which,
            client.clone(),
            cache.clone(),
            LayerOptions::default(),
            fs,
        )
    };
    let (base, top) = (mount(0), mount(1));
    top._session.slot().set_lowers(&[base._session.slot()]);
    (base, top)
}

fn is_local(m: &Mounted, path: &str) -> bool {
    let node = m
        .layer
        .index()
        .lookup(path)
        .unwrap_or_else(|| panic!("{path} is not in the layer"));
    m.layer.is_local(node)
}

/// Waits until every file of `in_top` is local in `top`, and every one of
/// `in_base` in `base`; fails naming the missing ones after a minute
/// (generous: the guest kernels of `cargo xtask vm-test` run emulated).
fn wait_until_local(
    top: &Mounted,
    in_top: &[String],
    base: &Mounted,
    in_base: &[String],
    what: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let missing: Vec<&String> = in_top
            .iter()
            .filter(|p| !is_local(top, p))
            .chain(in_base.iter().filter(|p| !is_local(base, p)))
            .collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} never fetched: {missing:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn read_app_init(top: &Mounted) -> PathBuf {
    let init = Path::new(SITE).join("app/__pycache__/__init__.cpython-311.pyc");
    let bytes = std::fs::read(top.path.join(&init)).unwrap();
    assert!(bytes.len() > 16);
    init
}

#[test]
fn an_opened_module_has_its_imports_fetched_in_its_layer_and_below_python3_rootfs() {
    let f = two_layer_fixture();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (base, top) = mount_both(&f, &rt, &FsOptions::default());
    read_app_init(&top);
    let in_top = [
        format!("{SITE}/app/__pycache__/decoder.cpython-311.pyc"),
        format!("{SITE}/app/__pycache__/encoder.cpython-311.pyc"),
    ];
    let in_base = [
        // Imported by app/__init__.
        format!("{STDLIB}/__pycache__/codecs.cpython-311.pyc"),
        // Imported by app/decoder, fetched for app/__init__: followed.
        format!("{STDLIB}/re/__pycache__/__init__.cpython-311.pyc"),
        format!("{STDLIB}/lib-dynload/_json.cpython-311-x86_64-linux-gnu.so"),
        // Imported by re: followed in the base layer as well.
        format!("{STDLIB}/re/__pycache__/_compiler.cpython-311.pyc"),
    ];
    wait_until_local(&top, &in_top, &base, &in_base, "imported modules");
    // Only what is imported: a module nothing here imports stays remote.
    assert!(!is_local(
        &base,
        &format!("{STDLIB}/__pycache__/tarfile.cpython-311.pyc")
    ));
    for m in [&top, &base] {
        assert!(m.layer.stats.followed_files.load(Ordering::Relaxed) > 0);
    }
    // Nothing was read from the base layer: all of it was fetched ahead.
    assert_eq!(base.layer.stats.served_bytes.load(Ordering::Relaxed), 0);
}

/// A module a prefetch profile holds has nothing followed, even once the
/// profile's work is done: the start it was recorded from read what it
/// needed next, which the profile holds too. A module the profile does not
/// hold (a start that is not the recorded one) has its imports followed.
#[test]
fn a_module_a_profile_holds_has_nothing_followed_python3_rootfs() {
    use sluice_puller::prefetch::{PrefetchEntry, PrefetchOptions, Prefetcher};

    let f = two_layer_fixture();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (base, top) = mount_both(&f, &rt, &FsOptions::default());
    let prefetcher = Prefetcher::start(rt.handle(), PrefetchOptions::default());
    let entry = |path: &str| PrefetchEntry {
        path: path.into(),
        offset: 0,
        len: 1 << 20,
        order: 0,
    };
    let init = format!("{SITE}/app/__pycache__/__init__.cpython-311.pyc");
    prefetcher.prefetch_profile(&base.layer, &[entry("etc/os-release")]);
    prefetcher.prefetch_profile(&top.layer, &[entry(&init)]);
    rt.block_on(prefetcher.wait_idle());
    assert!(!base.layer.profile_pending() && !top.layer.profile_pending());
    read_app_init(&top);
    std::thread::sleep(Duration::from_secs(2));
    let decoder = format!("{SITE}/app/__pycache__/decoder.cpython-311.pyc");
    assert!(!is_local(&top, &decoder));
    assert!(!is_local(
        &base,
        &format!("{STDLIB}/__pycache__/codecs.cpython-311.pyc")
    ));
    for m in [&top, &base] {
        assert_eq!(m.layer.stats.followed_files.load(Ordering::Relaxed), 0);
    }

    // Not in the profile: followed as without one.
    std::fs::read(top.path.join(&decoder)).unwrap();
    let in_base = [
        format!("{STDLIB}/re/__pycache__/__init__.cpython-311.pyc"),
        format!("{STDLIB}/lib-dynload/_json.cpython-311-x86_64-linux-gnu.so"),
    ];
    wait_until_local(
        &top,
        &[],
        &base,
        &in_base,
        "a module's imports beyond the profile",
    );
}

/// The libraries an ELF object needs, found as the loader finds them
/// (`lib/x86_64-linux-gnu/libffi.so.8`: through Debian's `lib -> usr/lib`
/// and the library's own version link), are fetched when its start is read.
#[test]
fn an_opened_library_has_the_libraries_it_needs_fetched_python3_rootfs() {
    let f = two_layer_fixture();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (base, _top) = mount_both(&f, &rt, &FsOptions::default());
    let ctypes = format!("{STDLIB}/lib-dynload/_ctypes.cpython-311-x86_64-linux-gnu.so");
    let libffi = "usr/lib/x86_64-linux-gnu/libffi.so.8.1.2";
    assert!(!is_local(&base, libffi));
    let mut head = [0u8; 64];
    std::fs::File::open(base.path.join(&ctypes))
        .and_then(|f| std::os::unix::fs::FileExt::read_exact_at(&f, &mut head, 0))
        .unwrap();
    assert_eq!(&head[..4], b"\x7fELF");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !is_local(&base, libffi) {
        assert!(Instant::now() < deadline, "{libffi} never fetched");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(base.layer.stats.followed_files.load(Ordering::Relaxed) > 0);
}

#[test]
fn without_follow_imports_nothing_below_is_fetched_python3_rootfs() {
    let f = two_layer_fixture();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let fs = FsOptions {
        follow_imports: false,
        ..FsOptions::default()
    };
    let (base, top) = mount_both(&f, &rt, &fs);
    read_app_init(&top);
    // What the open of a `.pyc` would have started has had time to run.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(base.layer.stats.fetched_bytes.load(Ordering::Relaxed), 0);
    assert_eq!(top.layer.stats.followed_files.load(Ordering::Relaxed), 0);
}

/// Before any container exists, the image's command (a script in the top
/// layer, `#!/usr/bin/env python3`) has its interpreter found through
/// `PATH` and symbolic links in the base layer and fetched with its loader
/// (`PT_INTERP`, through `lib64 -> usr/lib64` and an absolute link) and
/// libraries, the modules Python reads at start, and the modules the script
/// imports (and theirs): without one read of either layer.
#[test]
fn the_image_command_is_fetched_before_its_container_starts_python3_rootfs() {
    let f = two_layer_fixture();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (base, top) = mount_both(&f, &rt, &FsOptions::default());
    top._session.slot().start_command(StartCommand {
        argv: vec!["start".into(), "--verbose".into()],
        path: vec!["/usr/local/bin".into(), "/usr/bin".into(), "/bin".into()],
        working_dir: "/".into(),
        locale: None,
    });
    let in_top = [
        "usr/local/bin/start".to_string(),
        format!("{SITE}/app/__pycache__/__init__.cpython-311.pyc"),
        // Imported by app/__init__: followed.
        format!("{SITE}/app/__pycache__/decoder.cpython-311.pyc"),
    ];
    let in_base = [
        "usr/bin/python3.11".to_string(),
        "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2".to_string(),
        "usr/lib/x86_64-linux-gnu/libc.so.6".to_string(),
        "usr/lib/x86_64-linux-gnu/libexpat.so.1.8.10".to_string(),
        // Read by every start of a dynamic program, and of python3 in the
        // C locale.
        "etc/ld.so.cache".to_string(),
        "usr/lib/locale/C.utf8/LC_CTYPE".to_string(),
        format!("{STDLIB}/__pycache__/sitecustomize.cpython-311.pyc"),
        format!("{STDLIB}/encodings/__pycache__/__init__.cpython-311.pyc"),
        format!("{STDLIB}/encodings/__pycache__/utf_8.cpython-311.pyc"),
        // Imported by encodings: followed.
        format!("{STDLIB}/encodings/__pycache__/aliases.cpython-311.pyc"),
    ];
    wait_until_local(&top, &in_top, &base, &in_base, "the command's files");
    assert!(!is_local(
        &base,
        &format!("{STDLIB}/__pycache__/tarfile.cpython-311.pyc")
    ));
    for m in [&top, &base] {
        assert_eq!(m.layer.stats.served_bytes.load(Ordering::Relaxed), 0);
    }
}

/// The files the container runtime reads before the program runs
/// (`etc/passwd`, `etc/group`) are fetched at the pull even while a profile
/// is being fetched; what the command loads is then left to the profile (the
/// snapshotter follows an image's command only without one).
#[test]
fn the_runtime_files_are_fetched_even_beside_a_profile_python3_rootfs() {
    use sluice_puller::prefetch::{PrefetchEntry, PrefetchOptions, Prefetcher};

    let f = two_layer_fixture();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (base, top) = mount_both(&f, &rt, &FsOptions::default());
    // A profile whose prefetch stays pending for the whole test: capped at
    // a byte a second.
    let prefetcher = Prefetcher::start(
        rt.handle(),
        PrefetchOptions {
            bytes_per_second: 1,
            ..PrefetchOptions::default()
        },
    );
    let entry = PrefetchEntry {
        path: "usr/bin/python3.11".into(),
        offset: 0,
        len: 1 << 20,
        order: 0,
    };
    let start = PrefetchEntry {
        path: "usr/local/bin/start".into(),
        ..entry.clone()
    };
    assert_eq!(prefetcher.prefetch_profile(&base.layer, &[entry]), 1);
    assert_eq!(prefetcher.prefetch_profile(&top.layer, &[start]), 1);
    assert!(base.layer.profile_pending());
    top._session.slot().start_command(StartCommand {
        argv: vec!["python3".into()],
        path: vec!["/usr/bin".into()],
        working_dir: "/".into(),
        locale: None,
    });
    top._session.slot().start_runtime_files();
    let runtime = ["etc/passwd".to_string(), "etc/group".to_string()];
    wait_until_local(&top, &[], &base, &runtime, "the runtime's files");
    std::thread::sleep(Duration::from_secs(1));
    for path in ["etc/ld.so.cache", "usr/lib/x86_64-linux-gnu/libc.so.6"] {
        assert!(!is_local(&base, path), "{path} fetched beside the profile");
    }
}

/// A command that is not in the image, or not a program, fetches nothing
/// and fails nothing.
#[test]
fn a_command_not_in_the_image_fetches_nothing_python3_rootfs() {
    let f = two_layer_fixture();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (base, top) = mount_both(&f, &rt, &FsOptions::default());
    for argv in [
        vec!["no-such-program".to_string()],
        vec!["/usr/lib/python3.11/../../../../../etc/no-such-file".to_string()],
    ] {
        top._session.slot().start_command(StartCommand {
            argv,
            path: vec!["/usr/bin".into()],
            working_dir: "/".into(),
            locale: None,
        });
    }
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(base.layer.stats.fetched_bytes.load(Ordering::Relaxed), 0);
    assert_eq!(top.layer.stats.fetched_bytes.load(Ordering::Relaxed), 0);
}
