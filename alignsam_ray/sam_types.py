"""The SAM 2.1 and SAM 3 types, as data without importing torch (the command line builds ``--sam``'s choices
from them at every start; ``foundation.sam2_models`` and ``foundation.sam3_models`` build and load the models).

    SAM2_TYPES     type -> (the sam2 package's config, the official checkpoint file name)
    SAM3_TYPES     type -> the official checkpoint file name (facebook/sam3 on Hugging Face)
    SAM3_INSTALL   the commands that install the sam3 package without downgrading the core set
"""

SAM2_TYPES = {
    "sam2.1_hiera_t": ("configs/sam2.1/sam2.1_hiera_t.yaml", "sam2.1_hiera_tiny.pt"),
    "sam2.1_hiera_s": ("configs/sam2.1/sam2.1_hiera_s.yaml", "sam2.1_hiera_small.pt"),
    "sam2.1_hiera_b+": ("configs/sam2.1/sam2.1_hiera_b+.yaml", "sam2.1_hiera_base_plus.pt"),
    "sam2.1_hiera_l": ("configs/sam2.1/sam2.1_hiera_l.yaml", "sam2.1_hiera_large.pt"),
}
SAM3_TYPES = {"sam3": "sam3.pt"}
# sam3 0.1.4 pins tqdm<4.68, typing_extensions<4.16 and huggingface-hub<2, below what the core set installs: the
# extra holds the modules sam3 imports, and sam3 itself goes in without its pins (docs/store.md: SAM 3)
SAM3_INSTALL = 'pip install "alignsam_ray[sam3]" && pip install --no-deps "sam3==0.1.4"'
