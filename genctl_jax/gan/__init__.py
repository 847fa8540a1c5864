"""GAN family: losses and regularisers (pix2pix / pix2pixHD, SPADE, StyleGAN2, StyleGAN-NADA)."""
