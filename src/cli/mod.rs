//! The command line: llama.cpp's flag spellings in, one module per family of subcommands, the
//! library does the work.

mod args;
mod bench;
#[cfg(feature = "cuda")]
mod cuda_check;
mod files;
mod generate;
mod plan;
mod serve;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "dh-server",
    version,
    about = "llama.cpp-style inference with a compressed KV cache"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// OpenAI-compatible HTTP server (the default subcommand, like llama-server).
    Serve(serve::ServeArgs),
    /// One-shot generation (like llama-cli / llama-simple).
    Run(generate::RunArgs),
    /// Perplexity of a text file, as llama-perplexity computes it.
    Perplexity(generate::PplArgs),
    /// Error and speed of every KV cache type on synthetic or captured K/V rows.
    Codecs(bench::CodecsArgs),
    /// Prompt and generation speed, llama-bench's tests and output.
    Bench(bench::BenchArgs),
    /// Will a model fit? Memory by component and a verdict per device.
    Plan(plan::PlanArgs),
    /// The best KV cache type that fits this machine's memory (what `-ctk auto` uses).
    Select(plan::SelectArgs),
    /// How fast per-layer embedding rows come out of a memory-mapped file, cold and warm.
    MmapProfile(plan::MmapProfileArgs),
    /// HF safetensors directory → GGUF (llama.cpp tensor names and keys, f32 tensors).
    Convert(files::ConvertArgs),
    /// Needle in a haystack: recall of a fact placed early in a long context, per cache type.
    Needle(generate::NeedleArgs),
    /// Random-weight llama GGUF with a real model's shapes (llama-8b, llama-1b), for speed runs.
    Synth(files::SynthArgs),
    /// The engine on the GPU against the CPU (-m), or one layer's decode attention timed.
    #[cfg(feature = "cuda")]
    CudaCheck(cuda_check::CudaCheckArgs),
}

/// llama.cpp's multi-letter single-dash flags, which clap cannot declare as short options.
const LLAMA_FLAGS: &[(&str, &str)] = &[
    ("-ctk", "--cache-type-k"),
    ("-ctv", "--cache-type-v"),
    ("-ngl", "--n-gpu-layers"),
    ("-np", "--parallel"),
    ("-fa", "--flash-attn"),
    ("-ub", "--ubatch-size"),
    ("-pg", "--prompt-gen"),
];

/// The process's arguments with llama.cpp's spellings made clap's, and `serve` put in front of
/// a command line that starts with a flag (`dh-server -m model.gguf ...` serves, as
/// llama-server does).
fn args() -> Vec<String> {
    let mut args: Vec<String> = std::env::args()
        .map(|a| {
            LLAMA_FLAGS
                .iter()
                .find(|(short, _)| *short == a)
                .map_or(a, |(_, long)| long.to_string())
        })
        .collect();
    if args.get(1).is_some_and(|a| {
        a.starts_with('-') && !matches!(a.as_str(), "-h" | "--help" | "-V" | "--version")
    }) {
        args.insert(1, "serve".into());
    }
    args
}

pub fn main() -> ExitCode {
    let cli = Cli::parse_from(args());
    let serving = matches!(cli.command, Command::Serve(_));
    log::init(serving);
    if !serving {
        // Offline commands end quietly when their reader goes away (`dh-server plan | head`),
        // as Unix tools do; the server keeps Rust's ignored SIGPIPE and sees EPIPE per socket.
        // SAFETY: restoring a signal's default disposition before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let result = match cli.command {
        Command::Serve(a) => serve::main(&a),
        Command::Run(a) => generate::run_main(&a),
        Command::Perplexity(a) => generate::perplexity_main(&a),
        Command::Needle(a) => generate::needle_main(&a),
        Command::Codecs(a) => bench::codecs_main(&a),
        Command::Bench(a) => bench::bench_main(&a),
        Command::Plan(a) => plan::plan_main(&a),
        Command::Select(a) => plan::select_main(&a),
        Command::MmapProfile(a) => plan::mmap_profile_main(&a),
        Command::Convert(a) => files::convert_main(&a),
        Command::Synth(a) => files::synth_main(&a),
        #[cfg(feature = "cuda")]
        Command::CudaCheck(a) => cuda_check::main(&a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // candle errors carry a backtrace after the message; users get the message line.
            let msg = format!("{e:#}");
            eprintln!("error: {}", msg.lines().next().unwrap_or_default());
            ExitCode::FAILURE
        }
    }
}

/// Progress and diagnostics (the library's `tracing` events) on stderr: the server's with time
/// and level, as a log; the offline commands' as bare lines (`warning: ` before warnings), as
/// llama.cpp's tools print them.
mod log {
    use std::fmt;

    use tracing::{Event, Level, Subscriber};
    use tracing_subscriber::fmt::format::Writer;
    use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
    use tracing_subscriber::registry::LookupSpan;

    pub fn init(serving: bool) {
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let fmt = tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_target(false)
            .with_ansi(ansi);
        if serving {
            fmt.init();
        } else {
            fmt.event_format(Plain).init();
        }
    }

    struct Plain;

    impl<S, N> FormatEvent<S, N> for Plain
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
        N: for<'a> FormatFields<'a> + 'static,
    {
        fn format_event(
            &self,
            ctx: &FmtContext<'_, S, N>,
            mut w: Writer<'_>,
            event: &Event<'_>,
        ) -> fmt::Result {
            match *event.metadata().level() {
                Level::ERROR => write!(w, "error: ")?,
                Level::WARN => write!(w, "warning: ")?,
                _ => {}
            }
            ctx.field_format().format_fields(w.by_ref(), event)?;
            writeln!(w)
        }
    }
}
