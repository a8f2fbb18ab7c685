"""dopsd_fast: kernel-accelerated D-OPSD trainer."""
