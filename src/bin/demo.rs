fn main() {
    eprintln!("demo: not implemented yet");
    std::process::exit(1);
}
