//! Choosing the next token from logits: greedy (argmax, lowest id on ties, as `torch.argmax`) or
//! temperature + nucleus (top-p) sampling.

use rand::Rng;

use super::GenerationConfig;

/// Picks the next token from logits `[vocab]` (host).
pub fn sample(logits: &[f32], config: &GenerationConfig, rng: &mut rand::rngs::StdRng) -> u32 {
    let argmax = || {
        let mut best = 0;
        for (i, &v) in logits.iter().enumerate() {
            if v > logits[best] {
                best = i;
            }
        }
        best as u32
    };
    if config.temperature == 0.0 {
        return argmax();
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(usize, f64)> =
        logits.iter().enumerate().map(|(i, &v)| (i, (((v - max) / config.temperature) as f64).exp())).collect();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let total: f64 = probs.iter().map(|p| p.1).sum();
    let mut kept = 0;
    let mut mass = 0.0;
    for p in &probs {
        kept += 1;
        mass += p.1 / total;
        if mass >= config.top_p as f64 {
            break;
        }
    }
    let probs = &probs[..kept];
    let kept_total: f64 = probs.iter().map(|p| p.1).sum();
    let mut r = rng.random::<f64>() * kept_total;
    for &(i, p) in probs {
        if r < p {
            return i as u32;
        }
        r -= p;
    }
    probs[kept - 1].0 as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn greedy_takes_the_first_of_equal_maxima() {
        let cfg = GenerationConfig::default();
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        assert_eq!(sample(&[0.5, 2.0, -1.0, 2.0], &cfg, &mut rng), 1);
    }

    #[test]
    fn a_tiny_nucleus_is_greedy() {
        let cfg = GenerationConfig { temperature: 1.0, top_p: 1e-6, ..Default::default() };
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..20 {
            assert_eq!(sample(&[0.1, 3.0, 0.2], &cfg, &mut rng), 1);
        }
    }
}
