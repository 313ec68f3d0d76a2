//! Starts the emulator by hand: `cargo run -p apiserver -- --port 6443 --kubeconfig /tmp/kc`.

use std::time::Duration;

fn usage() -> ! {
    eprintln!("usage: apiserver [--port N] [--kubeconfig PATH] [--write-latency-ms N]");
    std::process::exit(2)
}

// The emulator serves from its own multi-thread runtime (one worker per
// core, see `ApiServer::start_with`); this one only waits for Ctrl-C.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut config = apiserver::Config::default();
    let mut kubeconfig = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--port" => {
                config.port = args
                    .next()
                    .and_then(|p| p.parse().ok())
                    .unwrap_or_else(|| usage())
            }
            "--kubeconfig" => kubeconfig = Some(args.next().unwrap_or_else(|| usage())),
            "--write-latency-ms" => {
                config.write_latency = Duration::from_millis(
                    args.next()
                        .and_then(|p| p.parse().ok())
                        .unwrap_or_else(|| usage()),
                )
            }
            "-h" | "--help" => usage(),
            _ => usage(),
        }
    }
    let api = apiserver::ApiServer::start_with(config).await?;
    if let Some(path) = &kubeconfig {
        api.write_kubeconfig(path)?;
        println!("kubeconfig written to {path}");
    }
    println!("Kubernetes API emulator listening on {}", api.url());
    tokio::signal::ctrl_c().await?;
    Ok(())
}
