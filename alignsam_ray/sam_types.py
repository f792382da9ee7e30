"""The SAM 2.1 types, as data without importing torch (the command line builds ``--sam``'s choices from
them at every start; ``foundation.sam2_models`` builds and loads the models).

    SAM2_TYPES   type -> (the sam2 package's config, the official checkpoint file name)
"""

SAM2_TYPES = {
    "sam2.1_hiera_t": ("configs/sam2.1/sam2.1_hiera_t.yaml", "sam2.1_hiera_tiny.pt"),
    "sam2.1_hiera_s": ("configs/sam2.1/sam2.1_hiera_s.yaml", "sam2.1_hiera_small.pt"),
    "sam2.1_hiera_b+": ("configs/sam2.1/sam2.1_hiera_b+.yaml", "sam2.1_hiera_base_plus.pt"),
    "sam2.1_hiera_l": ("configs/sam2.1/sam2.1_hiera_l.yaml", "sam2.1_hiera_large.pt"),
}
