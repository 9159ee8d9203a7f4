//! Statistics, scores, allocation and compaction (in progress).
