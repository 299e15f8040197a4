//! `dh-server`: flags in, library calls out (the subcommands are in `cli/`).

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
