// Diffusion SAE frontend extension. ComfyUI serves WEB_DIRECTORY (./web) at /extensions/diffusion_sae/,
// so this file is /extensions/diffusion_sae/js/diffusion_sae.js and the app module is three levels up.
import { app } from "../../../scripts/app.js";

app.registerExtension({
  name: "diffusion_sae",
});
