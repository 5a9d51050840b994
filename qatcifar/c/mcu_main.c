/* The toolkit's harness for an exported C folder on an emulated Cortex-M4 (qemu-system-arm -M mps2-an386):
 * reads quantized images from images.bin through semihosting, writes each image's int32 logits to logits.bin,
 * and prints the SysTick ticks per image (QEMU with -icount shift=0 runs one instruction a nanosecond, and
 * SysTick counts the board's 25 MHz clock: a tick is 40 instructions) and the stack model_run used below main's
 * stack pointer (the stack is painted first; what is no longer paint was used: at most 32 bytes more than that).
 * Not part of the exported model: qatcifar/mcu.py builds it beside the folder's sources. */
#include <stdio.h>
#include <stdint.h>
#include "model.h"

#define SYST_CSR (*(volatile uint32_t *)0xE000E010u)
#define SYST_RVR (*(volatile uint32_t *)0xE000E014u)
#define SYST_CVR (*(volatile uint32_t *)0xE000E018u)
#define PAINT 0xA5u
#define PAINTED 16384u  /* stack bytes below main's frame painted before the first image */

extern void _start(void);

/* The vector table: the initial stack pointer and the reset handler (newlib's crt0, which calls main). */
__attribute__((section(".vectors"), used)) static void (*const vectors[2])(void) = {
    (void (*)(void))0x20400000u, _start
};

static uint32_t ticks(void)
{
    return SYST_CVR;
}

static uintptr_t stack_pointer(void)
{
    uintptr_t sp;
    __asm__ volatile("mov %0, sp" : "=r"(sp));
    return sp;
}

/* Paint PAINTED bytes of stack below this function's frame (32 bytes down); returns the lowest painted byte. */
__attribute__((noinline)) static uint8_t *paint(void)
{
    uint8_t *top = (uint8_t *)(stack_pointer() - 32u), *p;
    for (p = top - PAINTED; p < top; p++)
        *p = PAINT;
    return top - PAINTED;
}

/* The stack used below `sp` (main's stack pointer): down to the lowest byte that is no longer paint. */
static uint32_t stack_used(uintptr_t sp, const uint8_t *bottom)
{
    const uint8_t *p = bottom;
    while (p < (const uint8_t *)sp && *p == PAINT)
        p++;
    return (uint32_t)(sp - (uintptr_t)p);
}

/* A loop of a known instruction count (subs, bne: two a turn), to check what a tick is. */
__attribute__((noinline)) static uint32_t calibrate(uint32_t turns)
{
    uint32_t start = ticks();
    __asm__ volatile("1: subs %0, %0, #1\n bne 1b" : "+r"(turns) : : "cc");
    return (start - ticks()) & 0xFFFFFFu;
}

int main(void)
{
    FILE *in = fopen("images.bin", "rb"), *out = fopen("logits.bin", "wb");
    int32_t logits[MODEL_NUM_CLASSES];
    uint8_t *image = model_input(), *bottom;
    uintptr_t sp;
    uint32_t count = 0, most = 0, least = 0xFFFFFFu, used = 0;
    uint64_t total = 0;
    if (!in || !out) {
        printf("error: cannot open images.bin or logits.bin\n");
        return 1;
    }
    SYST_RVR = 0xFFFFFFu;
    SYST_CVR = 0;
    SYST_CSR = 5u;  /* enabled, the processor's clock, no interrupt */
    sp = stack_pointer();
    bottom = paint();
    while (fread(image, 1, MODEL_INPUT_BYTES, in) == MODEL_INPUT_BYTES) {
        uint32_t start = ticks(), spent;
        model_run(image, logits);
        spent = (start - ticks()) & 0xFFFFFFu;
        total += spent;
        most = spent > most ? spent : most;
        least = spent < least ? spent : least;
        fwrite(logits, sizeof logits, 1, out);
        count++;
    }
    used = stack_used(sp, bottom);
    fclose(out);
    fclose(in);
    printf("images %lu ticks %llu least %lu most %lu stack %lu calibration %lu\n", (unsigned long)count,
           (unsigned long long)total, (unsigned long)least, (unsigned long)most, (unsigned long)used,
           (unsigned long)calibrate(1000000u));
    return 0;
}
