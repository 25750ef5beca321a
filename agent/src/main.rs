use clap::Parser;

/// jemalloc rather than glibc's malloc: after a flood of thousands of connections closes,
/// glibc kept every freed page (5000 idle clients left 83 MiB resident against 9 MiB
/// before), while jemalloc hands them back to the kernel within its decay time (14 MiB
/// 15 s later), and leaves the buffers hyper reserves for a connection that never sends a
/// byte untouched, so not resident at all.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read when it starts (the symbol carries the crate's `_rjem_`
/// prefix). Without a background thread, freed pages are only returned when the process
/// allocates again, and an agent idle after a flood would keep them; one thread is enough.
#[cfg(feature = "jemalloc")]
#[export_name = "_rjem_malloc_conf"]
static MALLOC_CONF: &[u8; 48] = b"background_thread:true,max_background_threads:1\0";

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
