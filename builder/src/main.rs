use clap::Parser;

fn main() {
    let cli = amictl::cmd::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = tokio::runtime::Runtime::new().expect("start the tokio runtime");
    match runtime.block_on(cli.run()) {
        Ok(code) => std::process::exit(code),
        Err(err) => {
            // Display with its causes, not Debug: users read this, not developers.
            eprintln!("error: {err:#}");
            std::process::exit(1);
        }
    }
}
