use clap::Parser;

fn main() {
    let cli = sealfs::cli::Cli::parse();
    std::process::exit(sealfs::cli::main_with(cli));
}
