use clap::Parser;

/// Exit code for a command line clap rejected: 2, but 3 ("unknown") for `health`, whose
/// 2 means "unhealthy" and must not be claimed by a typo in a monitoring job.
fn usage_exit_code(err: &clap::Error) -> i32 {
    use clap::error::ErrorKind;
    if matches!(
        err.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
    ) {
        return 0;
    }
    match std::env::args().nth(1).as_deref() {
        Some("health") => 3,
        _ => 2,
    }
}

fn main() {
    let cli = match amictl::cmd::Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            std::process::exit(usage_exit_code(&err));
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let on_error = cli.command.error_exit_code();
    let runtime = tokio::runtime::Runtime::new().expect("start the tokio runtime");
    match runtime.block_on(cli.run()) {
        Ok(code) => std::process::exit(code),
        Err(err) => {
            // Display with its causes, not Debug: users read this, not developers.
            eprintln!("error: {err:#}");
            std::process::exit(on_error);
        }
    }
}
