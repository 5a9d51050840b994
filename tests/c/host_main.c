/* A host harness for an exported C folder (the tests build it with sanitizers): reads quantized images from
 * argv[1], writes each image's int32 logits to argv[2]; every other image is written into model_input() first
 * (model_run's copy-free path). With argv[3], also 8-bit RGB images from it quantized by model_quantize_rgb,
 * written to argv[4]. */
#include <stdio.h>
#include <string.h>
#include "model.h"

int main(int argc, char **argv)
{
    static uint8_t image[MODEL_INPUT_BYTES], rgb[MODEL_INPUT_BYTES];
    int32_t logits[MODEL_NUM_CLASSES];
    float real[MODEL_NUM_CLASSES];
    FILE *in, *out;
    long count = 0;
    if (argc != 3 && argc != 5)
        return 2;
    in = fopen(argv[1], "rb");
    out = fopen(argv[2], "wb");
    if (!in || !out)
        return 2;
    while (fread(image, 1, sizeof image, in) == sizeof image) {
        if (count++ % 2) {
            memcpy(model_input(), image, sizeof image);
            model_run(model_input(), logits);
        } else {
            model_run(image, logits);
        }
        model_logits_float(logits, real);
        fwrite(logits, sizeof logits, 1, out);
    }
    fclose(in);
    fclose(out);
    if (argc == 5) {
        in = fopen(argv[3], "rb");
        out = fopen(argv[4], "wb");
        if (!in || !out)
            return 2;
        while (fread(rgb, 1, sizeof rgb, in) == sizeof rgb) {
            model_quantize_rgb(rgb, image);
            fwrite(image, 1, sizeof image, out);
        }
        fclose(in);
        fclose(out);
    }
    return 0;
}
