use clap::Parser;

fn main() {
    let cli = match ami_agent::cmd::Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            std::process::exit(ami_agent::cmd::usage_exit_code(&err, std::env::args()));
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match cli.runtime() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            std::process::exit(3);
        }
    };
    let code = match runtime.block_on(cli.run()) {
        Ok(code) => code,
        Err(err) => {
            // Display with its causes, not Debug: operators read this, not developers.
            eprintln!("error: {err:#}");
            1
        }
    };
    std::process::exit(code);
}
