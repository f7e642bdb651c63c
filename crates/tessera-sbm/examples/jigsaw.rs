//! The jigsaw task SBM trains on: a maximal-Hamming permutation set and one image's tiles
//! shuffled by one of them (written as PNG).
//!
//! ```text
//! cargo run -p tessera-sbm --example jigsaw -- [OUT.png]
//! ```

use tessera_sbm::{permute_tiles, PermutationSet};

fn main() -> tessera_core::Result<()> {
    let perms = PermutationSet::maximal_hamming(3, 30, 0)?;
    println!(
        "{} classes (identity + 30 permutations of 3×3 tiles), minimum Hamming distance {}",
        perms.classes(),
        perms.min_distance()
    );
    // A gradient image, 3 × 96 × 96 (CHW), shuffled by class 7.
    let (h, w) = (96usize, 96usize);
    let chw: Vec<f32> = (0..3 * h * w)
        .map(|i| ((i % (h * w)) / w) as f32 / h as f32 * (1 + i / (h * w)) as f32 / 3.0)
        .collect();
    let shuffled = permute_tiles(&chw, 3, h, w, perms.perm(7));
    let out = std::env::args().nth(1).unwrap_or_else(|| {
        std::env::temp_dir()
            .join("tessera-jigsaw.png")
            .display()
            .to_string()
    });
    let img = image::RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let px = |c: usize| (shuffled[c * h * w + y as usize * w + x as usize] * 255.0) as u8;
        image::Rgb([px(0), px(1), px(2)])
    });
    tessera_core::io::write_atomic_with(out.as_ref(), |f| {
        img.write_to(f, image::ImageFormat::Png)
            .map_err(std::io::Error::other)
    })?;
    println!("tile order of class 7: {:?}; wrote {out}", perms.perm(7));
    Ok(())
}
