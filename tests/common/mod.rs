//! Shared test helpers: where the fixtures, data and models are.
#![allow(dead_code)]

use std::path::PathBuf;

use dhurandhar::engine::{Engine, EngineConfig};
use dhurandhar::kv::CacheType;

/// The project's shared folder (`../shared` beside the checkout, or `$DH_SHARED`).
pub fn shared_dir() -> PathBuf {
    let candidates = [
        std::env::var("DH_SHARED").ok().map(PathBuf::from),
        Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared")),
        Some(PathBuf::from("/work/shared")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.join("fixtures/hf-tiny").is_dir())
        .expect(
            "shared fixtures not found: set DH_SHARED to the folder holding fixtures/ and data/",
        )
}

pub fn fixture(arch: &str) -> PathBuf {
    shared_dir().join("fixtures/hf-tiny").join(arch)
}

/// A model fetched by scripts/fetch-models.sh.
pub fn model(file: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join(file);
    assert!(
        p.exists(),
        "{} missing: run scripts/fetch-models.sh",
        p.display()
    );
    p
}

pub fn smollm2() -> PathBuf {
    model("SmolLM2-135M-Instruct.Q4_1.gguf")
}

pub fn gemma3_270m() -> PathBuf {
    model("gemma-3-270m-q4_k_m.gguf")
}

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_dh-server"))
}

/// A SpectralQuant calibration file for `model` under the build's scratch directory.
pub fn scratch_calibration(model: &std::path::Path) -> PathBuf {
    let name: String = model
        .to_string_lossy()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}.kv-calibration.safetensors"))
}

/// Loads `model` for `n_ctx` tokens with one cache type for every layer's K and V.
pub fn engine(model: PathBuf, n_ctx: usize, ty: CacheType) -> Engine {
    let model_name = model.clone();
    Engine::load(&EngineConfig {
        model,
        n_ctx,
        cache_k: ty,
        cache_v: ty,
        chat_template: None,
        kv_layer_policy: Some("uniform".into()),
        kv_centering: true,
        ple_resident: false,
        // SpectralQuant's calibration goes to the build's scratch space, not beside shared fixtures.
        kv_calibration: Some(scratch_calibration(&model_name)),
        device: Default::default(),
        n_gpu_layers: None,
    })
    .unwrap()
}

/// A `dh-server` process on a free port, killed when dropped. Servers started through
/// [`Server::start`] run one at a time, so tests in one binary don't fight over the 2 cores.
pub struct Server {
    child: std::process::Child,
    pub base: String,
    pub log: PathBuf,
    _turn: std::sync::MutexGuard<'static, ()>,
}

static SERVER_TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Server {
    pub fn start(args: &[&str]) -> Server {
        let turn = SERVER_TURN.lock().unwrap_or_else(|e| e.into_inner());
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let log = std::env::temp_dir().join(format!("dh-server-test-{port}.log"));
        let child = std::process::Command::new(bin())
            .args([
                "-m",
                smollm2().to_str().unwrap(),
                "--port",
                &port.to_string(),
            ])
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn dh-server");
        let server = Server {
            child,
            base: format!("http://127.0.0.1:{port}"),
            log,
            _turn: turn,
        };
        let t0 = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t0.elapsed().as_secs() < 120,
                "server did not start: {}",
                server.log_text()
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        server
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().expect("wait for server")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
