//! Weights files that do not fit give errors naming the file and the tensor.

use candle_core::{DType, Device, Tensor};
use tessera_backbone::{random_weights, Arch, Backbone, WeightsSource};

fn write(name: &str, t: &std::collections::HashMap<String, Tensor>) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tessera-bb-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    candle_core::safetensors::save(t, &p).unwrap();
    p
}

#[test]
fn wrong_shape_missing_tensor_and_missing_file() {
    let dev = Device::Cpu;
    let mut t = random_weights(&Arch::ResNet18.spec(), 3, 1, &dev).unwrap();
    t.insert(
        "layer2.0.conv1.weight".into(),
        Tensor::zeros((128, 64, 5, 5), DType::F32, &dev).unwrap(),
    );
    let p = write("wrong_shape.safetensors", &t);
    let e = Backbone::load(Arch::ResNet18, &WeightsSource::File(p), 3, &dev)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("wrong_shape.safetensors")
            && e.contains("layer2.0.conv1.weight")
            && e.contains("wrong shape"),
        "{e}"
    );

    // An R18 file given for R50.
    let t = random_weights(&Arch::ResNet18.spec(), 3, 1, &dev).unwrap();
    let p = write("r18.safetensors", &t);
    let e = Backbone::load(Arch::ResNet50, &WeightsSource::File(p.clone()), 3, &dev)
        .unwrap_err()
        .to_string();
    assert!(e.contains("r18.safetensors"), "{e}");

    // Truncated after layer2: fine for depth 2, an error naming layer3 for depth 3.
    let mut t2 = t.clone();
    t2.retain(|k, _| !k.starts_with("layer3"));
    let p = write("l2.safetensors", &t2);
    assert!(Backbone::load(Arch::ResNet18, &WeightsSource::File(p.clone()), 2, &dev).is_ok());
    let e = Backbone::load(Arch::ResNet18, &WeightsSource::File(p), 3, &dev)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("layer3.0.conv1.weight") && e.contains("missing"),
        "{e}"
    );

    let e = Backbone::load(
        Arch::ResNet18,
        &WeightsSource::File("/no/such.safetensors".into()),
        3,
        &dev,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("/no/such.safetensors") && e.contains("does not exist"),
        "{e}"
    );

    let p = write("junk.safetensors", &Default::default());
    std::fs::write(&p, b"garbage").unwrap();
    let e = Backbone::load(Arch::ResNet18, &WeightsSource::File(p), 3, &dev)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("junk.safetensors") && e.contains("not a safetensors file"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(
        std::env::temp_dir().join(format!("tessera-bb-{}", std::process::id())),
    );
}

#[test]
fn all_architectures_build_with_expected_channels() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((1, 3, 32, 32), DType::F32, &dev).unwrap();
    for (arch, ch) in [
        (Arch::ResNet18, [64, 128, 256]),
        (Arch::ResNet34, [64, 128, 256]),
        (Arch::ResNet50, [256, 512, 1024]),
        (Arch::WideResNet50_2, [256, 512, 1024]),
    ] {
        let net = Backbone::load(arch, &WeightsSource::Random { seed: 3 }, 3, &dev).unwrap();
        let f = net.forward(&x).unwrap();
        assert_eq!(f.channels(), ch.to_vec(), "{arch}");
        assert_eq!(f.levels[2].dims()[2..], [2, 2]);
    }
}
