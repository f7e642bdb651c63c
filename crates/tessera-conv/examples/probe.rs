use std::time::Instant;
fn time_gemm(m: usize, n: usize, k: usize, par: gemm::Parallelism) -> f64 {
    let a = vec![1.0f32; m * k];
    let b = vec![0.5f32; k * n];
    let mut c = vec![0f32; m * n];
    let run = |c: &mut [f32]| unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            1,
            n as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    };
    run(&mut c);
    let reps = 10;
    let t = Instant::now();
    for _ in 0..reps {
        run(&mut c);
    }
    let s = t.elapsed().as_secs_f64() / reps as f64;
    2.0 * (m * n * k) as f64 / s / 1e9
}
fn main() {
    for (m, n, k) in [
        (32usize, 256usize, 2304usize),
        (64, 256, 2304),
        (128, 256, 2304),
        (256, 256, 2304),
        (112, 64, 576),
        (224, 64, 576),
        (64, 128, 1152),
        (128, 128, 1152),
        (256, 128, 1152),
        (256, 64, 147),
        (512, 64, 147),
        (196, 256, 2304),
        (196, 64, 576),
        (784, 64, 576),
    ] {
        let p1 = time_gemm(m, n, k, gemm::Parallelism::None);
        let p2 = time_gemm(m, n, k, gemm::Parallelism::Rayon(2));
        println!("m {m} n {n} k {k}: 1 thread {p1:.1} GFLOP/s, 2 threads {p2:.1}");
    }
}
