fn main() {
    let cli = sealfs::cli::parse();
    std::process::exit(sealfs::cli::main_with(cli));
}
