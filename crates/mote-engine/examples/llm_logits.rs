//! Dump the logits of every position of a token sequence (for comparing with other runtimes).
//! Usage: llm_logits FILE.gguf OUT.npy ID [ID...]

use std::sync::Arc;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let ids: Vec<u32> = args[3..].iter().map(|a| a.parse().unwrap()).collect();
    let store = mote_store::Store::open(std::env::temp_dir().join("mote-llm-logits")).unwrap();
    let r: mote_store::Reference = "dump:latest".parse().unwrap();
    store
        .import(
            std::path::Path::new(&args[1]),
            Some(&"dump:latest".parse().unwrap()),
            &Default::default(),
        )
        .unwrap();
    let m = mote_engine::Model::open(&store, &r, &Default::default()).unwrap();
    let llm: Arc<mote_engine::llm::Llm> = m.llm().unwrap().clone();
    let model = llm.model();
    let mut s = model.sequence();
    let l = model
        .forward(&mut [&mut s], &[&ids], true)
        .unwrap()
        .remove(0);
    let t = mote_engine::Tensor::new(
        vec![ids.len(), model.config().vocab],
        mote_engine::TensorData::F32(l),
    )
    .unwrap();
    std::fs::write(&args[2], mote_engine::npy::write(&t)).unwrap();
}
