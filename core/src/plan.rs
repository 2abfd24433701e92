//! Partition planning: how many partitions a campaign gets and which rows each one owns.
//!
//! Every target row carries a `bucket` in `0..BUCKETS`, computed by MySQL from the row's content
//! when the row is inserted. Partition `n` of `N` owns the contiguous bucket range
//! `[n * BUCKETS / N, (n + 1) * BUCKETS / N)`; 840 is divisible by every count from 1 to 8, so
//! the ranges are equal. A row therefore belongs to exactly one partition under any plan, and a
//! new plan never needs to rewrite rows.

/// Number of buckets (the `% 840` in the target tables' `bucket` column).
pub const BUCKETS: u16 = 840;

/// Largest supported partition count.
pub const MAX_PARTITIONS: u16 = 8;

/// The row-count thresholds of the partition rule (requirements: ≤ 1,000,000 → 4; more than
/// 1,000,000 and less than 2,000,000 → 6; 2,000,000 or more → 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionRule {
    /// Campaigns with at least this many rows get 6 partitions.
    pub medium_from: u64,
    /// Campaigns with at least this many rows get 8 partitions.
    pub large_from: u64,
    /// A fixed count overriding the rule (for measurements), 1..=8.
    pub fixed: Option<u16>,
}

impl Default for PartitionRule {
    fn default() -> Self {
        PartitionRule { medium_from: 1_000_001, large_from: 2_000_000, fixed: None }
    }
}

impl PartitionRule {
    pub fn partitions_for(&self, rows: u64) -> u16 {
        if let Some(n) = self.fixed {
            n.clamp(1, MAX_PARTITIONS)
        } else if rows >= self.large_from {
            8
        } else if rows >= self.medium_from {
            6
        } else {
            4
        }
    }
}

/// One partition's share of a campaign.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionSlice {
    pub partition_no: u16,
    pub partition_count: u16,
    /// First bucket owned.
    pub bucket_lo: u16,
    /// First bucket not owned.
    pub bucket_hi: u16,
}

/// The slices of an `count`-partition plan; `count` is clamped to `1..=MAX_PARTITIONS`.
pub fn slices(count: u16) -> Vec<PartitionSlice> {
    let count = count.clamp(1, MAX_PARTITIONS);
    (0..count)
        .map(|n| PartitionSlice {
            partition_no: n,
            partition_count: count,
            bucket_lo: n * BUCKETS / count,
            bucket_hi: (n + 1) * BUCKETS / count,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_partition_rule_at_its_boundaries() {
        let rule = PartitionRule::default();
        let table = [
            (0, 4),
            (1, 4),
            (999_999, 4),
            (1_000_000, 4),
            (1_000_001, 6),
            (1_999_999, 6),
            (2_000_000, 8),
            (5_000_000, 8),
        ];
        for (rows, want) in table {
            assert_eq!(rule.partitions_for(rows), want, "{rows} rows");
        }
    }

    #[test]
    fn configured_thresholds_move_the_boundaries() {
        let rule = PartitionRule { medium_from: 10, large_from: 20, fixed: None };
        assert_eq!(rule.partitions_for(9), 4);
        assert_eq!(rule.partitions_for(10), 6);
        assert_eq!(rule.partitions_for(19), 6);
        assert_eq!(rule.partitions_for(20), 8);
    }

    #[test]
    fn a_fixed_count_overrides_the_rule() {
        let rule = PartitionRule { fixed: Some(2), ..PartitionRule::default() };
        assert_eq!(rule.partitions_for(5_000_000), 2);
        assert_eq!(PartitionRule { fixed: Some(0), ..rule }.partitions_for(1), 1);
        assert_eq!(PartitionRule { fixed: Some(12), ..rule }.partitions_for(1), 8);
    }

    #[test]
    fn slices_cover_every_bucket_exactly_once() {
        for count in 1..=MAX_PARTITIONS {
            let s = slices(count);
            assert_eq!(s.len(), usize::from(count));
            assert_eq!(s[0].bucket_lo, 0);
            assert_eq!(s[s.len() - 1].bucket_hi, BUCKETS);
            for pair in s.windows(2) {
                assert_eq!(pair[0].bucket_hi, pair[1].bucket_lo);
            }
            let sizes: Vec<u16> = s.iter().map(|p| p.bucket_hi - p.bucket_lo).collect();
            assert!(sizes.iter().all(|&n| n == BUCKETS / count), "{sizes:?}");
        }
    }
}
