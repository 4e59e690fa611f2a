fn main() -> anyhow::Result<()> {
    let mut bpf = aya::EbpfLoader::new().load(ztxdp::BPF_OBJECT)?;
    for (name, p) in bpf.programs_mut() {
        match p {
            aya::programs::Program::Xdp(x) => x.load()?,
            aya::programs::Program::SchedClassifier(x) => x.load()?,
            _ => {}
        }
        println!("loaded {name}");
    }
    for (name, _) in bpf.maps() { println!("map {name}"); }
    Ok(())
}
